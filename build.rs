//! Makes binaries, tests and benches find libtorch without LD_LIBRARY_PATH, and keeps
//! CUDA linked on GPU machines.
//!
//! torch-sys links with `--as-needed`, so a binary that calls no symbol of
//! `libtorch_cuda.so` directly drops it and then sees no GPU. Forcing it in is only
//! right when the file exists: the lean CPU libtorch has none.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: no rpath added for libtorch");
        return;
    };
    let lib = Path::new(&lib);
    let lib = lib.canonicalize().unwrap_or_else(|_| lib.to_path_buf());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let root = lib.parent().unwrap_or(&lib);
    println!("cargo:rustc-env=CPS3D_LIBTORCH_DIR={}", root.display());
    println!("cargo:rustc-env=CPS3D_LIBTORCH_VERSION={}", libtorch_version(root));
    build_c10d_shim(root);
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The C++ side of `src/distributed`: c10d's TCPStore and Gloo process group, compiled
/// against libtorch's headers (and the Gloo declarations in `gloo_decl/`, which libtorch
/// does not ship) with the flags libtorch was built with.
fn build_c10d_shim(root: &Path) {
    let shim = Path::new("src/distributed/c10d_shim.cpp");
    println!("cargo:rerun-if-changed={}", shim.display());
    println!("cargo:rerun-if-changed=src/distributed/gloo_decl");
    let base = || {
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            .file(shim)
            .include("src/distributed/gloo_decl")
            .include(root.join("include"))
            .include(root.join("include/torch/csrc/api/include"))
            .define("USE_DISTRIBUTED", None)
            .define("USE_C10D_GLOO", None)
            // The PyPI wheels (which both libtorch folders come from) use the C++11 ABI.
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            // libtorch's headers warn a lot under -Wall; the shim's own code is small.
            .flag_if_supported("-w");
        build
    };
    let without_nccl = |why: String| {
        println!(
            "cargo:warning=CUDA libtorch, but {why}: built without NCCL, CUDA gradients are reduced by Gloo through \
             host memory (scripts/setup-libtorch.sh --gpu installs the headers)"
        );
    };
    if root.join("lib/libtorch_cuda.so").exists() {
        match nccl_include_dirs(root) {
            Ok(dirs) => {
                let mut build = base();
                build.define("USE_C10D_NCCL", None);
                for d in dirs {
                    build.include(d);
                }
                // A header set that does not compile (another CUDA's, a partial install) means
                // Gloo only, not a failed build.
                match build.try_compile("cps3d_c10d") {
                    Ok(()) => return,
                    Err(e) => without_nccl(format!("the NCCL process group does not compile here ({e})")),
                }
            }
            Err(missing) => without_nccl(format!("no {missing} found")),
        }
    }
    base().compile("cps3d_c10d");
}

/// The folders that hold the headers ProcessGroupNCCL.hpp includes (NCCL's, CUDA's runtime,
/// its compiler's host headers, CCCL's and the math libraries' ATen's CUDA context names).
/// The NVIDIA wheels beside a pip torch come first — they are the versions torch was built
/// with — then `NCCL_INCLUDE_DIR`, `CUDA_HOME`, /usr/local/cuda and /usr/include. Err names
/// the first header found nowhere.
fn nccl_include_dirs(root: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=NCCL_INCLUDE_DIR");
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    // pip's layout: site-packages/{torch, nvidia/<package>/include}.
    if let Some(site) = root.parent() {
        let nvidia = site.join("nvidia");
        println!("cargo:rerun-if-changed={}", nvidia.display());
        if let Ok(entries) = std::fs::read_dir(&nvidia) {
            let mut wheels: Vec<_> = entries.flatten().map(|e| e.path().join("include")).collect();
            wheels.sort();
            for w in &wheels {
                println!("cargo:rerun-if-changed={}", w.display());
            }
            candidates.extend(wheels);
        }
    }
    for var in ["NCCL_INCLUDE_DIR", "CUDA_HOME"] {
        if let Ok(v) = std::env::var(var) {
            let p = Path::new(&v);
            candidates.push(if var == "CUDA_HOME" { p.join("include") } else { p.to_path_buf() });
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.push("/usr/include".into());
    let needed = ["nccl.h", "cuda_runtime_api.h", "crt/host_config.h", "nv/target", "cusparse.h", "cublas_v2.h"];
    let mut dirs = Vec::new();
    for header in needed {
        let dir = candidates.iter().find(|d| d.join(header).exists()).ok_or_else(|| header.to_string())?;
        if !dirs.contains(dir) {
            dirs.push(dir.clone());
        }
    }
    // Headers the found ones include in turn live beside them or in the other wheels.
    for d in &candidates {
        if d.exists() && !dirs.contains(d) && !d.starts_with("/usr/include") {
            dirs.push(d.clone());
        }
    }
    Ok(dirs)
}

/// The version written by scripts/setup-libtorch.sh (`build-version`), or the one in a
/// PyTorch install's `version.py`.
fn libtorch_version(root: &Path) -> String {
    if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
        return v.trim().to_string();
    }
    if let Ok(py) = std::fs::read_to_string(root.join("version.py")) {
        for line in py.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                return rest.trim_start_matches([' ', '=', ':']).trim().trim_matches(['\'', '"']).to_string();
            }
        }
    }
    "unknown".to_string()
}
