"""Golden cross-validation splits from nnU-Net itself, for src/training/splits.rs.

Produces tests/golden/splits.json: for each list of case ids, the ids sorted as nnU-Net's
nnUNetTrainer.do_split sorts them (np.sort) and the 5 folds that nnU-Net's own
generate_crossval_split(ids, seed=12345, n_splits=5) returns (KFold with shuffle).
The Rust unit test compares against this file; Python is not needed at test time.

Run (from the repository root):
    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install nnunetv2==2.8.1
    /tmp/refvenv/bin/python scripts/reference/splits.py

Generated with nnunetv2 2.8.1, scikit-learn 1.9.1, numpy 2.4.6 (also recorded in the
JSON under "generated_by").
"""

import json
import os
from importlib.metadata import version

import numpy as np
from nnunetv2.utilities.crossval_split import generate_crossval_split

SEED = 12345
N_SPLITS = 5


def case(name, ids):
    # Same sort as nnUNetTrainer.do_split: list(np.sort(list(identifiers))).
    sorted_ids = [str(i) for i in np.sort(list(ids))]
    splits = generate_crossval_split(sorted_ids, seed=SEED, n_splits=N_SPLITS)
    return {
        "name": name,
        "sorted_ids": sorted_ids,
        # np.str_ -> str so json can write them.
        "splits": [{"train": [str(i) for i in s["train"]], "val": [str(i) for i in s["val"]]} for s in splits],
    }


def main():
    cases = []
    for n in (5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 50, 51, 64):
        cases.append(case(f"case_n{n}", [f"case_{i:03d}" for i in range(n)]))
    # Upper case before lower, "a10" before "a2", "_" between: the byte order nnU-Net sorts by.
    mixed = ["b", "a10", "a2", "A", "z_1", "tsabd", "a_1", "B7", "chest_aorta", "Z"]
    cases.append(case("mixed_names", mixed))

    out = {
        "generated_by": {
            "script": "scripts/reference/splits.py",
            "nnunetv2": version("nnunetv2"),
            "scikit-learn": version("scikit-learn"),
            "numpy": version("numpy"),
        },
        "seed": SEED,
        "n_splits": N_SPLITS,
        "cases": cases,
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "tests", "golden", "splits.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: {len(cases)} cases")


if __name__ == "__main__":
    main()
