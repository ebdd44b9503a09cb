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
    cc::Build::new()
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
        .flag_if_supported("-w")
        .compile("cps3d_c10d");
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
