//! The `MIRROR(name): twin-path ..` tags: every copy of shared code written by hand in another
//! place (CUDA C, a hand-vectorized kernel, the f64 reference of the tests, the bindings)
//! names its twin, and the twin names it back with the same tag (but for include/lion.h,
//! which cbindgen generates). The test below keeps the tags true: each named twin exists and
//! carries the tag.
//!
//! A twin not written yet is named with `(pending` right after its path
//! (`MIRROR(q8): src/cuda/lion.cu q8 (pending: ..)`): it must exist and must not mention the
//! tag's name at all (any case). So the test fails as soon as the twin gains that code, with
//! or without the tag, until the tag drops `pending` and the twin tags back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One tag: its file, line, name and the paths it names.
#[derive(Debug)]
struct Tag {
    file: String,
    line: usize,
    name: String,
    twins: Vec<String>,
    /// The twins marked `(pending`.
    pending: Vec<String>,
}

const TOP_DIRS: [&str; 5] = ["src", "tests", "benches", "bindings", "include"];
const EXTENSIONS: [&str; 10] = ["rs", "cu", "h", "hpp", "c", "cpp", "py", "jl", "toml", "md"];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "__pycache__" {
                files(&path, out);
            }
        } else if EXTENSIONS.iter().any(|e| name.ends_with(&format!(".{e}"))) {
            out.push(path);
        }
    }
}

/// A repository path in a tag's text (`src/cuda/lion.cu`), if `word` is one.
fn as_path(word: &str) -> Option<String> {
    let w = word.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
    let top = w.split('/').next()?;
    (w.contains('/') && w.contains('.') && TOP_DIRS.contains(&top)).then(|| w.to_string())
}

/// The tags of one file. A tag's text runs on over the comment lines that follow it, up to a
/// blank comment line, a line of code or the next tag; each of its clauses (separated by `;`)
/// starts with the path of a twin.
fn tags_in(file: &str, text: &str) -> Vec<Tag> {
    let comment = |l: &str| {
        let l = l.trim_start();
        ["//", "#", "/*", "*"]
            .iter()
            .find_map(|p| l.strip_prefix(p))
            .map(|rest| rest.trim_start_matches(['/', '!', '*']).trim().to_string())
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut tags = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(at) = line.find("MIRROR(") else {
            continue;
        };
        let rest = &line[at + "MIRROR(".len()..];
        let Some(close) = rest.find("):") else {
            continue; // a mention, not a tag
        };
        let name = &rest[..close];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            continue;
        }
        let mut text = rest[close + 2..].to_string();
        for next in &lines[i + 1..] {
            match comment(next) {
                Some(c) if !c.is_empty() && !c.contains("MIRROR(") => {
                    text.push(' ');
                    text.push_str(&c);
                }
                _ => break,
            }
        }
        // `twin-path what; twin-path what; ..`: other paths in a clause are not twins.
        let clauses: Vec<(String, bool)> = text
            .split(';')
            .filter_map(|clause| {
                let words: Vec<&str> = clause.split_whitespace().collect();
                let path = as_path(words.first()?)?;
                let pending = words.iter().take(3).any(|w| w.starts_with("(pending"));
                Some((path, pending))
            })
            .collect();
        tags.push(Tag {
            file: file.to_string(),
            line: i + 1,
            name: name.to_string(),
            twins: clauses
                .iter()
                .filter(|c| !c.1)
                .map(|c| c.0.clone())
                .collect(),
            pending: clauses
                .iter()
                .filter(|c| c.1)
                .map(|c| c.0.clone())
                .collect(),
        });
    }
    tags
}

#[test]
fn every_mirror_tag_names_a_twin_that_tags_it_back() {
    // Reads the sources of the tree this binary was built from: a copy of the binary
    // elsewhere (the GPU bundle's) leaves this test out (run-tests.sh --skip).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("src").join("numerics").exists(),
        "the sources are not at {} (the tree this binary was built from)",
        root.display()
    );
    let mut paths = Vec::new();
    for dir in TOP_DIRS {
        files(&root.join(dir), &mut paths);
    }
    let mut texts = BTreeMap::new();
    let mut tags = Vec::new();
    for path in paths {
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if rel != "src/numerics/mirrors.rs" {
            tags.extend(tags_in(&rel, &text)); // (this file's examples are not tags)
        }
        texts.insert(rel, text);
    }
    let mut problems = Vec::new();
    for t in &tags {
        let at = format!("{}:{} MIRROR({})", t.file, t.line, t.name);
        if t.twins.is_empty() && t.pending.is_empty() {
            problems.push(format!("{at} names no twin path"));
        }
        for twin in &t.pending {
            match texts.get(twin) {
                None => problems.push(format!("{at}: {twin} does not exist")),
                Some(text) if text.to_lowercase().contains(&t.name.to_lowercase()) => problems
                    .push(format!(
                        "{at}: {twin} is marked pending but mentions {}: once the twin is \
                         written, tag it MIRROR({}) and drop `(pending` from this tag",
                        t.name, t.name
                    )),
                Some(_) => {}
            }
        }
        for twin in &t.twins {
            match texts.get(twin) {
                _ if *twin == t.file => problems.push(format!("{at} names its own file")),
                None => problems.push(format!("{at}: {twin} does not exist")),
                // The header is generated (and must not change): it cannot tag back.
                Some(_) if twin.starts_with("include/") => {}
                Some(text) if !text.contains(&format!("MIRROR({})", t.name)) => {
                    problems.push(format!("{at}: {twin} has no MIRROR({}) tag back", t.name))
                }
                Some(_) => {}
            }
        }
    }
    let names: std::collections::BTreeSet<&str> = tags.iter().map(|t| t.name.as_str()).collect();
    for name in [
        "update",
        "coeffs",
        "conversions",
        "rounding",
        "hash",
        "kernel-args",
    ] {
        if !names.contains(name) {
            problems.push(format!("no MIRROR({name}) tag is left"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_tag_reads_its_twins_across_lines() {
    let text =
        "x\n// MIRROR(update): src/a.rs f; src/b/c.cu g, not src/x.rs;\n// tests/d.rs (in f64)\n\
                fn f() {}\n// see `MIRROR(..)`\n";
    let tags = tags_in("src/e.rs", text);
    assert_eq!(tags.len(), 1);
    assert_eq!((tags[0].line, tags[0].name.as_str()), (2, "update"));
    assert_eq!(tags[0].twins, ["src/a.rs", "src/b/c.cu", "tests/d.rs"]);
    assert!(tags[0].pending.is_empty());
}

#[test]
fn a_pending_twin_is_read_apart() {
    let text = "// MIRROR(q8): src/cuda/lion.cu q8 (pending: not written); src/a.rs f\nfn f() {}\n";
    let tags = tags_in("src/e.rs", text);
    assert_eq!(tags[0].twins, ["src/a.rs"]);
    assert_eq!(tags[0].pending, ["src/cuda/lion.cu"]);
}
