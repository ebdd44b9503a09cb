//! The README and the user guide in docs/ against the program: every `cps3d` command line
//! they show (in code blocks and inline code) names a real subcommand and only options that
//! subcommand's `--help` lists, every option table under a command's heading lists real
//! options, every subcommand is documented somewhere, and every link lands on a file and
//! heading that exist. Documentation cannot drift from the CLI unnoticed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut v = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    v.extend(docs);
    v
}

fn rel(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(p).display().to_string()
}

/// The program's subcommands and, per command path ("train", "dataset check"), its help.
struct Cli {
    subcommands: BTreeSet<String>,
    help: std::cell::RefCell<BTreeMap<String, String>>,
}

impl Cli {
    fn new() -> Cli {
        let top = help_of(&[]);
        let subcommands = section(&top, "Commands:")
            .iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .filter(|c| c != "help")
            .collect();
        Cli { subcommands, help: Default::default() }
    }

    fn help(&self, path: &[String]) -> String {
        let key = path.join(" ");
        self.help.borrow_mut().entry(key).or_insert_with(|| help_of(path)).clone()
    }

    /// The command path a line names after `cps3d`: one word, or two for a command with
    /// subcommands of its own (`dataset check`).
    fn command(&self, words: &[&str]) -> Option<Vec<String>> {
        let first = words.first()?.to_string();
        if !self.subcommands.contains(&first) {
            return None;
        }
        let mut path = vec![first];
        let help = self.help(&path);
        let inner = section(&help, "Commands:");
        if let Some(second) = words.get(1) {
            if inner.iter().any(|l| l.split_whitespace().next() == Some(second)) {
                path.push(second.to_string());
            }
        }
        Some(path)
    }

    fn has_option(&self, path: &[String], option: &str) -> bool {
        if matches!(option, "--help" | "-h") {
            return true;
        }
        // Only the option list counts ("  -o, --out <OUT>", "      --epochs <EPOCHS>"), not a
        // name that some description mentions.
        self.help(path).lines().map(str::trim_start).filter(|l| l.starts_with('-')).any(|l| {
            let names = l.split("  ").next().unwrap_or("");
            names.split([',', ' ', '=', '[', '<']).any(|n| n.trim_end_matches("...") == option)
        })
    }
}

fn help_of(path: &[String]) -> String {
    let out = common::cps3d()
        .args(path)
        .arg("--help")
        .env_remove("CLICOLOR_FORCE")
        .env("NO_COLOR", "1")
        .output()
        .expect("cps3d runs");
    assert!(out.status.success(), "cps3d {} --help failed", path.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The indented lines under a help heading such as "Commands:".
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help.lines().skip_while(|l| l.trim() != heading).skip(1).take_while(|l| l.starts_with(' ')).collect()
}

/// Command lines of a page: each fenced block's lines (joined at trailing backslashes) and
/// each inline code span, with the line number where it starts.
fn command_texts(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            let (start, mut joined) = pending.take().unwrap_or((n, String::new()));
            joined.push_str(line.trim_end_matches('\\'));
            joined.push(' ');
            if line.trim_end().ends_with('\\') {
                pending = Some((start, joined));
            } else {
                out.push((start, joined));
            }
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 {
                out.push((n, span.to_string()));
            }
        }
    }
    out
}

/// Options named on a command line after the command, up to a shell operator or comment.
fn options_after(words: &[&str]) -> Vec<String> {
    let mut v = Vec::new();
    for w in words {
        if matches!(*w, "|" | "&&" | ";" | ">" | "2>&1" | "#" | "||" | "&") || w.starts_with('#') || w.starts_with('>')
        {
            break;
        }
        let w = w.trim_matches(|c| c == ',' || c == ')' || c == '(' || c == '"' || c == '\'');
        let name = w.split('=').next().unwrap_or(w);
        let long = name.starts_with("--")
            && name.len() > 2
            && name[2..].chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        let short = name.len() == 2 && name.starts_with('-') && name.as_bytes()[1].is_ascii_alphabetic();
        if long || short {
            v.push(name.to_string());
        }
    }
    v
}

#[test]
fn every_documented_command_line_uses_real_subcommands_and_options() {
    let cli = Cli::new();
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (line, cmd) in command_texts(&text) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            for (i, w) in words.iter().enumerate() {
                // `cps3d SUB`, or `cargo run --release -- SUB`.
                let binary = *w == "cps3d" || w.ends_with("/cps3d");
                let cargo_run = *w == "--" && words[..i].contains(&"run") && words[..i].contains(&"cargo");
                if !(binary || cargo_run) {
                    continue;
                }
                let after = &words[i + 1..];
                let Some(first) = after.first() else { continue };
                // Prose such as "cps3d 0.1.0" or "cps3d's": only lowercase words are commands.
                if !first.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                    continue;
                }
                let Some(path) = cli.command(after) else {
                    problems.push(format!("{}:{line}: `cps3d {first}` is not a subcommand", rel(&page)));
                    continue;
                };
                documented.insert(path[0].clone());
                for option in options_after(&after[path.len()..]) {
                    if !cli.has_option(&path, &option) {
                        problems.push(format!(
                            "{}:{line}: `cps3d {}` has no option {option}",
                            rel(&page),
                            path.join(" ")
                        ));
                    }
                }
            }
        }
        problems.extend(option_table_problems(&cli, &page, &text));
    }
    let undocumented: Vec<&String> = cli.subcommands.iter().filter(|c| !documented.contains(*c)).collect();
    assert!(undocumented.is_empty(), "subcommands no page shows: {undocumented:?}");
    assert!(problems.is_empty(), "the docs disagree with the CLI:\n{}", problems.join("\n"));
}

/// Table rows that start with an option (`| \`--flag\` | ...`) under a heading naming a
/// command must name that command's options.
fn option_table_problems(cli: &Cli, page: &Path, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut command: Option<Vec<String>> = None;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            command = line
                .split('`')
                .nth(1)
                .and_then(|code| code.strip_prefix("cps3d "))
                .and_then(|rest| cli.command(&rest.split_whitespace().collect::<Vec<_>>()));
            continue;
        }
        let (Some(path), true) = (&command, line.starts_with("| `")) else { continue };
        let first_cell = line.split('|').nth(1).unwrap_or("");
        let spans = first_cell.split('`').skip(1).step_by(2);
        for option in spans.flat_map(|s| options_after(&s.split(['/', ' ']).collect::<Vec<_>>())) {
            if !cli.has_option(path, &option) {
                problems.push(format!(
                    "{}:{}: table row names {option}, not an option of `cps3d {}`",
                    rel(page),
                    n + 1,
                    path.join(" ")
                ));
            }
        }
    }
    problems
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_block = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
        } else if !in_block && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_link_lands_on_a_file_and_heading_that_exist() {
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        let mut in_block = false;
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                in_block = !in_block;
            }
            if in_block {
                continue;
            }
            for part in line.split("](").skip(1) {
                let target = part.split(')').next().unwrap_or("");
                if target.starts_with("http") || target.starts_with("mailto:") || target.is_empty() {
                    continue;
                }
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let path = if file.is_empty() { page.clone() } else { dir.join(file) };
                if !path.exists() {
                    problems.push(format!("{}:{}: {target}: no such file", rel(&page), n + 1));
                    continue;
                }
                if !anchor.is_empty() && !anchors(&std::fs::read_to_string(&path).unwrap_or_default()).contains(anchor)
                {
                    problems.push(format!("{}:{}: {target}: no such heading", rel(&page), n + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn the_readme_is_a_front_page_that_links_every_guide_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.lines().count() <= 250, "README.md has {} lines: move detail into docs/", readme.lines().count());
    let index = std::fs::read_to_string(root.join("docs/README.md")).unwrap();
    for page in pages().iter().skip(1).filter(|p| !p.ends_with("docs/README.md")) {
        let name = page.file_name().unwrap().to_string_lossy();
        assert!(index.contains(&format!("]({name})")), "docs/README.md does not link {name}");
    }
}

#[test]
fn the_checker_catches_what_it_should() {
    let cli = Cli::new();
    assert!(cli.command(&["dataset", "check", "DIR"]).is_some_and(|p| p == ["dataset", "check"]));
    assert!(cli.command(&["trian"]).is_none());
    let train = vec!["train".to_string()];
    assert!(cli.has_option(&train, "--epochs") && cli.has_option(&train, "-o"));
    assert!(!cli.has_option(&train, "--epoch") && !cli.has_option(&train, "--no-such-option"));
    // Named in a description ("--resume continues a run" is train's; "--fold all" in prose) is not enough.
    assert!(cli.has_option(&train, "-v") && !cli.has_option(&["info".to_string()], "--epochs"));
    assert_eq!(options_after(&["--epochs", "3", "--fold=all", "-o", "x", "|", "--grep"]), ["--epochs", "--fold", "-o"]);
    assert_eq!(slug("`cps3d train SHARDS -o RUN_DIR`"), "cps3d-train-shards--o-run_dir");
    assert_eq!(
        command_texts("a `cps3d info` b\n```\ncps3d train x \\\n  --epochs 2\n```\n")[1].1.split_whitespace().count(),
        5
    );
}
