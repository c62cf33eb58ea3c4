//! Fuzzing harnesses: one function per parser of untrusted input, shared by the cargo-fuzz
//! targets in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the stored corpus and every
//! crash found so far through the same functions in a normal `cargo test`.
//!
//! Each function takes arbitrary bytes and must never panic, abort or run away with memory or
//! time: errors are the expected answer to bad input. Beyond "no panic", the harnesses check a
//! few invariants that kiln relies on (a decoded message encodes and decodes to itself, a parsed
//! image reference prints as text that parses to the same reference, version comparison is a
//! total order). Not part of kiln's API; hidden from its documentation.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::bus::status::BuildStatus;
use crate::bus::{
    self, BuildRequest, DeployCompleted, DeployFailed, EventKind, ImagePublished, Message,
    RecordedEvent, StageEvent,
};
use crate::digest::Digest256;
use crate::home::BlobStore;
use crate::kernel::{cpio, modules};
use crate::packages::index::{Index, StanzaReader, parse_relations};
use crate::packages::release::{self, Keyring, Release};
use crate::packages::{DebLimits, Version, deb};
use crate::store::{Descriptor, ImageConfig, OciManifest, Reference, registry, sign};
use crate::tree::{Content, EntryKind, Tree, TreePath};
use crate::verify::profile::{self, Profile};

/// A fuzz harness: takes any bytes, must never panic.
pub type Harness = fn(&[u8]);

/// Every target: its name (the directory names under `fuzz/corpus/` and `fuzz/regressions/`, and
/// the cargo-fuzz target names) and its harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("recipe", recipe),
    ("bus_message", bus_message),
    ("deb", deb),
    ("tar_tree", tar_tree),
    ("oci", oci),
    ("release", release),
    ("packages_index", packages_index),
    ("profile", profile),
    ("kernel_module", kernel_module),
];

/// Largest recipe the recipe harness loads: real recipes are a few KiB, and rendering time
/// grows with the text.
const RECIPE_MAX: usize = 16 * 1024;

/// Template syntax whose cost is not linear in the text (loops, repetition, recursion). Recipes
/// that use it are skipped here until template rendering runs on a fuel budget; everything
/// else (YAML, the preamble, schema and semantic checks, plain expressions and filters) is
/// fuzzed.
const COSTLY_TEMPLATE_WORDS: &[&str] = &[
    "for",
    "range",
    "*",
    "macro",
    "call",
    "include",
    "import",
    "extends",
    "recursive",
    "loop",
];

/// A scratch directory for the harnesses that need files, one per process.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("kiln-fuzz-")
            .tempdir()
            .unwrap_or_else(|e| panic!("fuzz harness: cannot create a scratch directory: {e}"))
    })
    .path()
}

/// True when the template markup (`{{ … }}`, `{% … %}`) of `text` uses none of
/// [`COSTLY_TEMPLATE_WORDS`].
fn templates_are_cheap(text: &str) -> bool {
    let mut rest = text;
    while let Some(start) = rest.find("{{").into_iter().chain(rest.find("{%")).min() {
        let body = &rest[start + 2..];
        let end = [body.find("}}"), body.find("%}")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(body.len());
        let markup = &body[..end];
        if COSTLY_TEMPLATE_WORDS.iter().any(|w| markup.contains(w)) {
            return false;
        }
        rest = &body[end..];
    }
    true
}

/// `kiln::recipe::load` on the input written as `recipe.yaml` (preamble, `extends:`, minijinja
/// rendering, schema and semantic validation, file templates), with no environment variables
/// and the project's own `templates/`. A loaded recipe must survive the JSON round trip that
/// stage records and messages put it through.
pub fn recipe(data: &[u8]) {
    if data.len() > RECIPE_MAX {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !templates_are_cheap(text) {
        return;
    }
    let dir = scratch().join("recipe");
    let path = dir.join("recipe.yaml");
    // A base for `extends: minimal.yaml` (as recipes/app.yaml has it) and a kernel fragment
    // for `kernel.build.fragment` (as recipes/minimal-custom-kernel.yaml has it).
    let base = include_str!("../recipes/minimal.yaml");
    let fragment = include_str!("../kernel-configs/virt-minimal.config");
    if std::fs::create_dir_all(dir.join("kernel-configs"))
        .and_then(|()| std::fs::write(dir.join("minimal.yaml"), base))
        .and_then(|()| std::fs::write(dir.join("kernel-configs/virt-minimal.config"), fragment))
        .and_then(|()| std::fs::write(&path, data))
        .is_err()
    {
        return;
    }
    let opts = crate::recipe::load::LoadOptions {
        templates_dir: Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/templates"
        ))),
        env: Some(BTreeMap::new()),
        ..Default::default()
    };
    match crate::recipe::load::load(&path, &opts) {
        Ok(loaded) => {
            let json = serde_json::to_vec(&loaded)
                .unwrap_or_else(|e| panic!("a loaded recipe does not serialize: {e}"));
            if let Err(e) = serde_json::from_slice::<crate::recipe::load::Loaded>(&json) {
                panic!("a loaded recipe does not deserialize from its own JSON: {e}");
            }
        }
        Err(d) => {
            let _ = d.to_json();
            let _ = d.location();
        }
    }
}

/// Decode a message of type `M`; when it decodes, its encoding must decode to the same value.
fn round_trip<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let msg = bus::decode::<M>(data).ok()?;
    match bus::decode::<M>(&bus::encode(&msg)) {
        Ok(back) => assert_eq!(back, msg, "{} message changed in a round trip", M::NAME),
        Err(e) => panic!(
            "{} message does not decode from its own encoding: {e}",
            M::NAME
        ),
    }
    Some(msg)
}

/// Every NATS message decoder on the same payload: `BuildRequest` (and its field checks), each
/// kind of `StageEvent` (then `BuildStatus::from_events` over what decoded), `ImagePublished`,
/// `DeployCompleted`, `DeployFailed`; subjects of what decoded.
pub fn bus_message(data: &[u8]) {
    if let Some(req) = round_trip::<BuildRequest>(data) {
        let _ = req.check();
    }
    let mut events = Vec::new();
    for (i, kind) in EventKind::ALL.into_iter().enumerate() {
        let event = StageEvent::decode(kind, data).map_err(|e| e.to_string());
        if let Ok(ev) = &event {
            let _ = ev.subject();
            match StageEvent::decode(kind, &ev.encode()) {
                Ok(back) => assert_eq!(&back, ev, "stage event changed in a round trip"),
                Err(e) => panic!("stage event does not decode from its own encoding: {e}"),
            }
        }
        events.push(RecordedEvent {
            sequence: i as u64 + 1,
            subject: String::new(),
            event,
        });
    }
    let build = events
        .iter()
        .find_map(|e| e.event.as_ref().ok())
        .map(|e| e.build().to_string())
        .unwrap_or_default();
    let _ = BuildStatus::from_events(&build, &events);
    if let Some(m) = round_trip::<ImagePublished>(data) {
        let _ = m.subject();
    }
    if let Some(m) = round_trip::<DeployCompleted>(data) {
        let _ = m.subject();
    }
    if let Some(m) = round_trip::<DeployFailed>(data) {
        let _ = m.subject();
    }
}

/// Fuzzed packages unpack to at most this much (control and data each).
const DEB_LIMIT: u64 = 4 << 20;

/// `packages::deb::read_deb` (ar container, control.tar and data.tar in every compression,
/// contents into a blob store) into a tree that already has merged-`/usr` symlinks.
pub fn deb(data: &[u8]) {
    // A tar's sparse holes alone may add up to `MAX_TAR_SPARSE_HOLES` of blobs: none are kept.
    let dir = scratch().join("blobs");
    let store = BlobStore::new(&dir);
    let limits = DebLimits {
        package: "fuzz".into(),
        installed_kib: None,
        control_bytes: DEB_LIMIT,
        data_bytes: DEB_LIMIT,
    };
    let mut tree = Tree::new();
    for (path, target) in [("usr", None), ("usr/bin", None), ("bin", Some("usr/bin"))] {
        let entry = match target {
            None => crate::tree::Entry::dir(0o755),
            Some(t) => crate::tree::Entry::symlink(t),
        };
        let _ = tree.add(path, entry);
    }
    if let Ok(info) = deb::read_deb(Path::new("fuzz.deb"), data, &limits, &mut tree, &store) {
        let _ = info.field("Package");
        let _ = tree.validate();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Files up to this size are kept in memory (and written to the cpio archive); larger ones,
/// which only GNU sparse holes can make from a small input, are counted and kept as zeros.
const TAR_INLINE_MAX: u64 = 1 << 20;

/// `Tree::extend_from_tar` (ustar, GNU, pax, xattrs, links, sparse files), then what later
/// stages do with a tree: validate it, count links, resolve hard links, merge it as a package
/// would be, and write it as a cpio initramfs. (kiln has no cpio reader: `kernel::cpio` only
/// writes.) What the entries expand to may exceed the input only by the sparse-hole budget.
pub fn tar_tree(data: &[u8]) {
    let mut tree = Tree::new();
    let mut expanded = 0u64;
    let mut store = |r: &mut dyn Read, _len: u64| -> io::Result<Content> {
        let mut head = Vec::new();
        r.take(TAR_INLINE_MAX).read_to_end(&mut head)?;
        let rest = io::copy(r, &mut io::sink())?;
        let len = head.len() as u64 + rest;
        expanded += len;
        assert!(
            expanded <= data.len() as u64 + crate::tree::MAX_TAR_SPARSE_HOLES,
            "{} bytes of tar expanded to {expanded} bytes of file contents",
            data.len()
        );
        Ok(if rest == 0 {
            Content::inline(head)
        } else {
            Content::Zeros { len }
        })
    };
    if tree.extend_from_tar(data, &mut store).is_err() {
        return;
    }
    let _ = tree.validate();
    let _ = tree.link_counts();
    let _ = tree.content_bytes();
    let links: Vec<TreePath> = tree
        .iter()
        .filter(|(_, e)| matches!(e.kind, EntryKind::HardLink { .. }))
        .map(|(p, _)| p.clone())
        .collect();
    for p in &links {
        let _ = tree.resolve_link(p);
    }
    let mut merged = Tree::new();
    let _ = deb::merge(&mut merged, &tree);
    let _ = cpio::write_tree(&tree, io::sink(), 0);
}

/// An OCI index: the part of it kiln reads (layout `index.json`, registry referrers).
#[derive(serde::Deserialize)]
struct OciIndex {
    #[serde(default)]
    #[allow(dead_code)]
    manifests: Vec<Descriptor>,
}

/// The OCI parsers on the same bytes: image manifest (which must survive re-serializing), index,
/// image config and signature payload as JSON; as text, an image reference (which must print
/// as text that parses to the same reference), a `WWW-Authenticate` challenge and a digest.
pub fn oci(data: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<OciManifest>(data) {
        let json = serde_json::to_vec(&m)
            .unwrap_or_else(|e| panic!("a parsed manifest does not serialize: {e}"));
        match serde_json::from_slice::<OciManifest>(&json) {
            Ok(back) => assert_eq!(back, m, "manifest changed in a round trip"),
            Err(e) => panic!("a manifest does not parse from its own JSON: {e}"),
        }
    }
    let _ = serde_json::from_slice::<OciIndex>(data);
    let _ = serde_json::from_slice::<ImageConfig>(data);
    let _ = serde_json::from_slice::<sign::SimpleSigning>(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(text) {
        let _ = r.manifest_ref();
        let printed = r.to_string();
        match Reference::parse(&printed) {
            Ok(back) => assert_eq!(back, r, "reference {text:?} printed as {printed:?}"),
            Err(e) => panic!("reference {text:?} printed as {printed:?}, which is refused: {e}"),
        }
    }
    if let Some(c) = registry::parse_challenge(text) {
        let _ = c.param("realm");
    }
    let _ = Digest256::parse(text);
    let _ = crate::store::reference::valid_tag(text);
}

/// `InRelease` against the Debian archive keyring (OpenPGP clearsigned parsing; a fuzzer cannot
/// forge a signature, so `Release::parse` is also run on the text directly), and Release dates.
pub fn release(data: &[u8]) {
    static KEYRING: OnceLock<Option<Keyring>> = OnceLock::new();
    if let Some(keyring) = KEYRING.get_or_init(|| Keyring::debian().ok())
        && let Ok(text) = release::verify_clearsigned(data, keyring)
    {
        let _ = Release::parse(&text);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Release::parse(text);
    for line in text.lines().take(64) {
        if let Some(secs) = release::parse_date(line) {
            let _ = release::format_date(secs);
        }
    }
}

/// A `Packages` index read as a stream, its entries' dependency fields, and Debian version
/// comparison (which must be a total order: antisymmetric and consistent with equality).
pub fn packages_index(data: &[u8]) {
    let mut versions: Vec<Version> = Vec::new();
    if let Ok(index) = Index::read(data) {
        for id in 0..index.len().min(64) {
            let entry = index.get(id);
            let _ = entry.dependencies();
            versions.push(entry.version());
            let _ = index.providers_of(entry.name());
        }
        let _ = index.essential();
    }
    let mut reader = StanzaReader::new(data);
    while let Ok(Some(stanza)) = reader.next_stanza() {
        for (_, value) in stanza.fields.iter().take(32) {
            if let Ok(groups) = parse_relations(value) {
                for rel in groups.iter().flatten() {
                    if let Some((op, v)) = &rel.constraint {
                        let _ = op.holds(v, v);
                        versions.push(v.clone());
                    }
                }
            }
        }
        if versions.len() > 64 {
            break;
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        versions.extend(text.split_whitespace().take(16).map(Version::new));
    }
    for a in &versions {
        for b in &versions {
            let ab = a.cmp(b);
            assert_eq!(ab, b.cmp(a).reverse(), "version order of {a} and {b}");
            assert_eq!(ab.is_eq(), a == b, "version equality of {a} and {b}");
        }
    }
}

/// A machine profile (`qemu/*.toml`): `Profile::parse` and the profile name check.
pub fn profile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Profile::parse("fuzz", "fuzz.toml", text);
    let _ = profile::check_name(text);
}

/// A kernel module from a package: the first byte picks the compression (none, zstd, gzip),
/// the rest is the file. `.modinfo` is found in the ELF and applied, and the same bytes are
/// read as `modules.builtin.modinfo` and `modules.builtin`.
pub fn kernel_module(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (name, compression) = match first % 3 {
        0 => ("m.ko", modules::ModuleCompression::None),
        1 => ("m.ko.zst", modules::ModuleCompression::Zstd),
        _ => ("m.ko.gz", modules::ModuleCompression::Gzip),
    };
    let Ok(tree_path) = TreePath::new(&format!("lib/modules/fuzz/{name}")) else {
        return;
    };
    let mut module = modules::Module {
        name: "m".into(),
        rel_path: name.into(),
        tree_path,
        content: Content::inline(rest.to_vec()),
        compression,
        depends: Vec::new(),
        softdep_pre: Vec::new(),
        softdep_post: Vec::new(),
        aliases: Vec::new(),
    };
    let mut index = modules::ModuleIndex::default();
    index.add_builtin_modinfo(rest);
    index.add_builtin_list(&String::from_utf8_lossy(rest));
    if let Ok(records) = modules::read_modinfo(&module) {
        modules::apply_modinfo(&mut module, &records);
        let name = module.name.clone();
        index.insert(module);
        let _ = index.resolve(&name);
    }
}
