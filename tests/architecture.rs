//! The crate's structure as its imports draw it: every source file is a node, every path
//! it names into another file (`crate::…`, `super::…`, `cps3d_storage::…`, globs included)
//! an edge, test modules left out. A module's own submodules are its parts and not counted
//! (a `mod.rs` dispatches to them, they use what it shares); between all other files the
//! graph must have no cycles, so that each can be read, tested and moved with only what
//! lies below it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One crate: its name as other crates write it and its source folder.
const CRATES: [(&str, &str); 3] = [("cps3d", "src"), ("cps3d_storage", "storage/src"), ("cps3d_actors", "actors/src")];

/// Module path (`cps3d::training::run`) of each source file.
fn modules() -> BTreeMap<String, PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = BTreeMap::new();
    for (krate, dir) in CRATES {
        let base = root.join(dir);
        let mut stack = vec![base.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                // Out-of-line test modules (`#[cfg(test)] mod tests;`) are tests, not structure.
                if p.extension().is_none_or(|x| x != "rs") || p.file_name().is_some_and(|f| f == "tests.rs") {
                    continue;
                }
                let rel = p.strip_prefix(&base).unwrap().with_extension("");
                let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
                if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                    parts.pop();
                }
                // The binary's files (main.rs and cli/) are a crate of their own over the library.
                let krate = if dir == "src" && (rel == Path::new("main") || parts.first().is_some_and(|f| f == "cli")) {
                    "cps3d_bin"
                } else {
                    krate
                };
                let name = std::iter::once(krate.to_string()).chain(parts).collect::<Vec<_>>().join("::");
                out.insert(name, p);
            }
        }
    }
    out
}

/// The file's text without comments and without its `#[cfg(test)]` modules.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<usize> = None;
    let mut depth = 0usize;
    let mut pending_test = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        if pending_test && skip_depth.is_none() && trimmed.starts_with("mod ") && trimmed.ends_with('{') {
            skip_depth = Some(depth);
        }
        pending_test = false;
        let bare = without_literals(line);
        let opens = bare.matches('{').count();
        let closes = bare.matches('}').count();
        depth = (depth + opens).saturating_sub(closes);
        if let Some(d) = skip_depth {
            if depth <= d {
                skip_depth = None;
            }
            continue;
        }
        out.push_str(&bare);
        out.push('\n');
    }
    out
}

/// The line without string contents, brace characters and its trailing comment, so that
/// neither `"{"`, `'}'` nor `"http://…"` is read as code.
fn without_literals(line: &str) -> String {
    let line = line.replace("'{'", "' '").replace("'}'", "' '");
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_string = false;
                    out.push('"');
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// Paths the code names: `a::b::c` sequences starting at a crate root or `super`, with
/// one level of `{…}` groups expanded.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < bytes.len() {
        if !is_ident(bytes[i]) || (i > 0 && (is_ident(bytes[i - 1]) || bytes[i - 1] == ':')) {
            i += 1;
            continue;
        }
        // Read a path a::b::c, and a following ::{x, y::z} group.
        let mut segs: Vec<String> = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < bytes.len() && is_ident(bytes[j]) {
                j += 1;
            }
            segs.push(bytes[start..j].iter().collect());
            if j + 2 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':' && is_ident(bytes[j + 2]) {
                j += 2;
                continue;
            }
            break;
        }
        let rooted = matches!(segs[0].as_str(), "crate" | "super" | "cps3d" | "cps3d_storage" | "cps3d_actors");
        if rooted && j + 2 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':' && bytes[j + 2] == '{' {
            let end = (j..bytes.len()).find(|&k| bytes[k] == '}').unwrap_or(bytes.len());
            let inner: String = bytes[j + 3..end].iter().collect();
            for item in inner.split(',') {
                let item = item.trim();
                if item.is_empty() {
                    continue;
                }
                let mut p = segs.clone();
                p.extend(item.split("::").map(|s| s.trim().split(' ').next().unwrap_or("").to_string()));
                paths.push(p);
            }
            i = end;
            continue;
        }
        // A glob (`use super::*;`) depends on the module it empties.
        let glob = j + 2 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':' && bytes[j + 2] == '*';
        if rooted && (segs.len() > 1 || glob) {
            if glob {
                segs.push("*".into());
            }
            paths.push(segs);
        }
        i = j.max(i + 1);
    }
    paths
}

/// The file modules each file's code names (other than itself).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let mut edges = BTreeMap::new();
    for (name, path) in &modules {
        let text = std::fs::read_to_string(path).unwrap();
        let here: Vec<&str> = name.split("::").collect();
        let krate = here[0];
        let mut to = BTreeSet::new();
        for p in named_paths(&code(&text)) {
            let mut abs: Vec<String> = match p[0].as_str() {
                "crate" => std::iter::once(krate.to_string()).chain(p[1..].iter().cloned()).collect(),
                "super" => {
                    // Module paths of mod.rs files name their folder, so each super is one step up.
                    let mut base: Vec<String> = here.iter().map(|s| s.to_string()).collect();
                    let supers = p.iter().take_while(|s| *s == "super").count();
                    base.truncate(base.len().saturating_sub(supers));
                    base.extend(p[supers..].iter().cloned());
                    base
                }
                "cps3d" | "cps3d_storage" | "cps3d_actors" => p.clone(),
                // Relative paths name the file's own submodules: its parts, see below.
                _ => continue,
            };
            // A path into the binary's cli resolves inside the binary crate.
            if abs[0] == "cps3d_bin"
                && abs.get(1).is_some_and(|s| s != "cli")
                && !modules.contains_key(&abs[..2].join("::"))
            {
                abs[0] = "cps3d".into();
            }
            // The longest prefix that is a file module.
            while !abs.is_empty() && !modules.contains_key(&abs.join("::")) {
                abs.pop();
            }
            // A module's own submodules are its parts: it may use them (dispatch, re-exports)
            // and they it. The rule is between modules that are not one inside the other.
            let target = abs.join("::");
            if abs.len() > 1 && target != *name && !target.starts_with(&format!("{name}::")) {
                to.insert(target);
            }
        }
        edges.insert(name.clone(), to);
    }
    edges
}

/// The strongly connected components of more than one file.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let names: Vec<&String> = edges.keys().collect();
    let index: BTreeMap<&String, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let reach = |from: usize| -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(n) = stack.pop() {
            for t in &edges[names[n]] {
                if let Some(&k) = index.get(t) {
                    if seen.insert(k) {
                        stack.push(k);
                    }
                }
            }
        }
        seen
    };
    let reaches: Vec<BTreeSet<usize>> = (0..names.len()).map(reach).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for a in 0..names.len() {
        if done.contains(&a) || !reaches[a].contains(&a) {
            continue;
        }
        let comp: Vec<usize> =
            (0..names.len()).filter(|&b| reaches[a].contains(&b) && reaches[b].contains(&a)).collect();
        done.extend(comp.iter().copied());
        out.push(comp.iter().map(|&k| names[k].clone()).collect());
    }
    out
}

#[test]
fn the_source_files_import_each_other_without_cycles() {
    let edges = graph();
    // The reader is sound: it sees the edges the project is known to have.
    let has = |a: &str, b: &str| edges.get(a).is_some_and(|t| t.contains(b));
    assert!(has("cps3d::training::run", "cps3d::training::trainer"), "{edges:#?}");
    assert!(has("cps3d_bin::cli::train", "cps3d::distributed::launch"), "{edges:#?}");
    assert!(has("cps3d_storage::verify", "cps3d_storage::reader"), "{edges:#?}");
    // Shared records live below their users: metrics reads nothing of training's, and
    // storage's verify reads shards through the reader, not the other way round.
    let up: Vec<&String> = edges["cps3d::metrics"].iter().filter(|t| t.starts_with("cps3d::training")).collect();
    assert!(up.is_empty(), "metrics depends on training: {up:?}");
    assert!(!has("cps3d_storage::reader", "cps3d_storage::verify"));
    let found = cycles(&edges);
    let inside: Vec<String> = found
        .iter()
        .flat_map(|c| {
            c.iter().flat_map(|a| edges[a].iter().filter(|b| c.contains(b)).map(move |b| format!("{a} -> {b}")))
        })
        .collect();
    assert!(found.is_empty(), "import cycles, the files' edges among themselves:\n{}", inside.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.insert("a".into(), ["b".to_string()].into());
    edges.insert("b".into(), ["c".to_string()].into());
    edges.insert("c".into(), ["a".to_string()].into());
    edges.insert("d".into(), ["a".to_string()].into());
    assert_eq!(cycles(&edges), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    assert_eq!(without_literals(r#"let s = "{ // }"; f('{'); // crate::x"#), r#"let s = ""; f(' '); "#);
}

#[test]
fn every_source_file_opens_with_a_line_saying_what_it_owns() {
    let missing: Vec<String> = modules()
        .values()
        .filter(|p| !std::fs::read_to_string(p).unwrap().starts_with("//! "))
        .map(|p| p.display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a leading //! line: {missing:#?}");
}
