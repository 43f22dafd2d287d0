//! The layering the tree shows, checked (docs/ARCHITECTURE.md, "Code layout"):
//!
//! - adapters (`src/adapters`) and the domain (`src/domain`) never name a use case, nor
//!   start-up (`context`) or the time budgets (`budget`), which are built on top of them;
//! - the domain does no I/O: no `async fn`, and no adapter that talks to the outside;
//! - an adapter uses another adapter only through the types they share (a user id, a sealed
//!   blob, an error, a setting, a secret that can be read again), never its client.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What an adapter may take from another adapter: plain types, no clients.
const SHARED_TYPES: &[&str] = &[
    "auth::UserId",
    "config::Config",
    "config::DEFAULT_SCOPES",
    "config::KlaviyoConfig",
    "crypto::CryptoError",
    "crypto::Purpose",
    "crypto::SealContext",
    "crypto::SealedBlob",
    "http::ApiError",
    "reload::Reloadable",
    "reload::Reloading",
    "reload::Source",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the source folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The file's code without comment lines and string literals (they may name anything).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read a source file");
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect();
    let (mut code, mut in_string, mut escaped) = (String::new(), false, false);
    for c in lines.join("\n").chars() {
        match (in_string, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, _, _) => escaped = false,
            (false, _, '"') => in_string = true,
            (false, _, c) => code.push(c),
        }
    }
    code
}

/// Whether `code` has `name` as a whole identifier.
fn names(code: &str, name: &str) -> bool {
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|word| word == name)
}

/// Every `adapters::<module>::<item>` the code names, `use` groups expanded.
fn adapter_items(code: &str) -> BTreeSet<String> {
    let mut items = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("adapters::") {
        rest = &rest[at + "adapters::".len()..];
        let module: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after = &rest[module.len()..];
        let Some(after) = after.strip_prefix("::") else {
            items.insert(format!("{module}::*"));
            continue;
        };
        let names: Vec<String> = match after.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap_or(group.len())]
                .split(',')
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .collect(),
            None => vec![
                after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            ],
        };
        for name in names {
            items.insert(format!("{module}::{name}"));
        }
    }
    items
}

fn relative(path: &Path) -> String {
    path.strip_prefix(src())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn adapters_and_the_domain_never_name_what_is_built_on_them() {
    let mut offences = Vec::new();
    for layer in ["adapters", "domain"] {
        for path in rust_files(&src().join(layer)) {
            let code = code(&path);
            for name in ["use_cases::", "crate::context", "crate::budget"] {
                if code.contains(name) {
                    offences.push(format!("{} names {name}", relative(&path)));
                }
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
}

#[test]
fn the_domain_does_no_io() {
    let mut offences = Vec::new();
    for path in rust_files(&src().join("domain")) {
        let code = code(&path);
        if code.contains("async fn") || code.contains(".await") {
            offences.push(format!("{} has async code", relative(&path)));
        }
        for name in ["Sealer", "Store", "Klaviyo", "EventBus", "reqwest"] {
            if names(&code, name) {
                offences.push(format!("{} names {name}", relative(&path)));
            }
        }
        if code.contains("aws_sdk") {
            offences.push(format!("{} names an AWS SDK", relative(&path)));
        }
        for item in adapter_items(&code) {
            if !SHARED_TYPES.contains(&item.as_str()) {
                offences.push(format!("{} uses {item}", relative(&path)));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
}

#[test]
fn adapters_share_only_types() {
    let adapters = src().join("adapters");
    let mut offences = Vec::new();
    for path in rust_files(&adapters) {
        let own = path
            .strip_prefix(&adapters)
            .unwrap()
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        for item in adapter_items(&code(&path)) {
            let module = item.split("::").next().unwrap_or_default();
            if module != own && !SHARED_TYPES.contains(&item.as_str()) {
                offences.push(format!("{} uses {item}", relative(&path)));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
}

/// The checks above find what they look for (a check that finds nothing proves nothing).
#[test]
fn the_checks_see_names_in_use_groups_and_paths() {
    let dir = std::env::temp_dir().join(format!("layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sample.rs");
    std::fs::write(
        &file,
        "// Klaviyo in a comment\nconst A: &str = \"Klaviyo \\\" Store\";\nfn f(k: &Klaviyo) {}\n",
    )
    .unwrap();
    let sample = code(&file);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        names(&sample, "Klaviyo") && !names(&sample, "Store"),
        "{sample}"
    );

    let items = adapter_items(
        "use crate::adapters::crypto::{Sealer, SealedBlob};\nlet s = crate::adapters::store::Store::new();",
    );
    assert_eq!(
        items.into_iter().collect::<Vec<_>>(),
        ["crypto::SealedBlob", "crypto::Sealer", "store::Store"]
    );
}
