//! The 13 FLARE 2022 abdominal organs and their label ids.

/// (label id, dataset.json name, short name used in FLARE22's score tables).
pub const FLARE22_ORGANS: [(u8, &str, &str); 13] = [
    (1, "liver", "Liver"),
    (2, "right_kidney", "RK"),
    (3, "spleen", "Spleen"),
    (4, "pancreas", "Pancreas"),
    (5, "aorta", "Aorta"),
    (6, "inferior_vena_cava", "IVC"),
    (7, "right_adrenal_gland", "RAG"),
    (8, "left_adrenal_gland", "LAG"),
    (9, "gallbladder", "Gallbladder"),
    (10, "esophagus", "Esophagus"),
    (11, "stomach", "Stomach"),
    (12, "duodenum", "Duodenum"),
    (13, "left_kidney", "LK"),
];

/// `dataset.json`'s `labels` object for the FLARE22 organs (nnU-Net v2 form).
pub fn flare22_labels_json() -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("background".into(), 0.into());
    for (id, name, _) in FLARE22_ORGANS {
        m.insert(name.into(), id.into());
    }
    serde_json::Value::Object(m)
}
