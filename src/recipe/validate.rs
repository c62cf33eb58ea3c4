//! Semantic checks on a merged recipe: what the schema's types cannot say (sizes that fit,
//! one root partition, absolute unique image paths, …). Pure: returns problems with the field path
//! they concern; `load` turns paths into `file:line:column`.

use super::schema::{FilesystemKind, Loader, PartitionType, Recipe};
use crate::disk::layout::{Size, parse_size};
use std::collections::{BTreeMap, BTreeSet};

/// One semantic problem, at a field path like `disk.partitions[1].size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    pub help: String,
}

fn problem(
    path: impl Into<String>,
    message: impl Into<String>,
    help: impl Into<String>,
) -> Problem {
    Problem {
        path: path.into(),
        message: message.into(),
        help: help.into(),
    }
}

/// GPT header, entries and 1 MiB alignment at the start, backup GPT at the end.
const DISK_OVERHEAD: u64 = 2 << 20;

/// Check a merged recipe; an empty list means it is valid.
pub fn validate(recipe: &Recipe) -> Vec<Problem> {
    let mut out = Vec::new();
    check_name(recipe, &mut out);
    check_kernel(recipe, &mut out);
    check_disk(recipe, &mut out);
    check_image_paths(recipe, &mut out);
    check_accounts(recipe, &mut out);
    if let Some(publish) = &recipe.publish
        && publish.repository.trim().is_empty()
    {
        out.push(problem(
            "publish.repository",
            "publish.repository is empty",
            "name the OCI repository, e.g. `localhost:5000/images/minimal`",
        ));
    }
    if let Some(expect) = &recipe.verify.expect
        && expect.trim().is_empty()
    {
        out.push(problem(
            "verify.expect",
            "verify.expect is empty",
            "give the text the booted image prints on its serial console",
        ));
    }
    out
}

fn check_name(recipe: &Recipe, out: &mut Vec<Problem>) {
    let name = &recipe.name;
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        out.push(problem(
            "name",
            if name.is_empty() {
                "the recipe has no `name`".to_string()
            } else {
                format!("invalid image name `{name}`")
            },
            "use lowercase letters, digits, `-`, `_` and `.`, starting with a letter or digit",
        ));
    }
}

fn check_kernel(recipe: &Recipe, out: &mut Vec<Problem>) {
    let k = &recipe.kernel;
    if k.package.is_some() && k.build.is_some() {
        out.push(problem(
            "kernel",
            "kernel has both `package` and `build`",
            "choose one: a Debian kernel package or a kernel built from a config fragment",
        ));
    }
    if k.package.is_none() && k.build.is_none() {
        out.push(problem(
            "kernel",
            "the recipe names no kernel",
            "set `kernel.package` (e.g. linux-image-cloud-amd64) or `kernel.build`",
        ));
    }
    if let Some(build) = &k.build
        && build.fragment.trim().is_empty()
    {
        out.push(problem(
            "kernel.build.fragment",
            "kernel.build has no `fragment`",
            "name a configuration fragment, e.g. kernel-configs/virt-minimal.config",
        ));
    }
}

fn check_disk(recipe: &Recipe, out: &mut Vec<Problem>) {
    let disk = &recipe.disk;
    if disk.partitions.is_empty() {
        out.push(problem(
            "disk.partitions",
            "the disk has no partitions",
            "add at least a `root` partition (and an `esp` for UEFI boot)",
        ));
        return;
    }
    let disk_size = match disk.size.as_deref().map(parse_size) {
        None => Some(Size::Auto),
        Some(Ok(Size::Rest)) => {
            out.push(problem(
                "disk.size",
                "disk.size cannot be `rest`",
                "use a size like `2G` or `auto`",
            ));
            None
        }
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            out.push(problem("disk.size", format!("disk.size: {e}"), SIZE_HELP));
            None
        }
    };
    let mut names = BTreeSet::new();
    let mut counts: BTreeMap<PartitionType, Vec<usize>> = BTreeMap::new();
    let mut explicit = 0u64;
    let mut rests = Vec::new();
    for (i, p) in disk.partitions.iter().enumerate() {
        let at = format!("disk.partitions[{i}]");
        if p.name.is_empty() {
            out.push(problem(
                at.to_string(),
                format!("partition {} has no name", i + 1),
                "give every partition a `name` (its GPT partition name)",
            ));
        } else if p.name.encode_utf16().count() > 36 {
            out.push(problem(
                format!("{at}.name"),
                format!("partition name `{}` is longer than 36 characters", p.name),
                "GPT partition names hold at most 36 UTF-16 characters",
            ));
        } else if !names.insert(p.name.clone()) {
            out.push(problem(
                format!("{at}.name"),
                format!("two partitions are named `{}`", p.name),
                "partition names must be unique",
            ));
        }
        counts.entry(p.kind).or_default().push(i);
        let fs = p.filesystem();
        let fits = match p.kind {
            PartitionType::Esp => fs == FilesystemKind::Fat32,
            PartitionType::Root => fs == FilesystemKind::Ext4,
            PartitionType::Data => matches!(fs, FilesystemKind::Ext4 | FilesystemKind::None),
            PartitionType::Swap => fs == FilesystemKind::Swap,
        };
        if !fits {
            out.push(problem(
                format!("{at}.filesystem"),
                format!(
                    "partition `{}` of type {:?} cannot hold filesystem {:?}",
                    p.name, p.kind, fs
                ),
                "esp takes fat32, root takes ext4, data takes ext4 or none, swap takes swap",
            ));
        }
        match p.size.as_deref().map(parse_size) {
            None | Some(Ok(Size::Auto)) => {}
            Some(Ok(Size::Rest)) => rests.push(i),
            Some(Ok(Size::Bytes(0))) => out.push(problem(
                format!("{at}.size"),
                format!("partition `{}` has size 0", p.name),
                SIZE_HELP,
            )),
            Some(Ok(Size::Bytes(n))) => explicit = explicit.saturating_add(n),
            Some(Err(e)) => out.push(problem(
                format!("{at}.size"),
                format!("partition `{}`: {e}", p.name),
                SIZE_HELP,
            )),
        }
        if p.mountpoint.is_some() && p.kind != PartitionType::Data {
            out.push(problem(
                format!("{at}.mountpoint"),
                format!(
                    "partition `{}`: only data partitions take a mountpoint",
                    p.name
                ),
                "remove `mountpoint`, or make the partition `type: data`",
            ));
        }
    }
    if rests.len() > 1 {
        out.push(problem(
            format!("disk.partitions[{}].size", rests[1]),
            "more than one partition has size `rest`",
            "only one partition can take the rest of the disk",
        ));
    }
    for kind in [PartitionType::Root, PartitionType::Esp] {
        if let Some(list) = counts.get(&kind)
            && list.len() > 1
        {
            out.push(problem(
                format!("disk.partitions[{}].type", list[1]),
                format!(
                    "two {kind:?} partitions (partitions {} and {})",
                    list[0] + 1,
                    list[1] + 1
                )
                .to_lowercase(),
                "a disk has one root and at most one ESP; use `type: data` for other partitions",
            ));
        }
    }
    if !counts.contains_key(&PartitionType::Root) {
        out.push(problem(
            "disk.partitions",
            "the disk has no root partition",
            "add a partition with `type: root`",
        ));
    }
    let loader = recipe.boot.loader.unwrap_or(Loader::SystemdBoot);
    if loader == Loader::SystemdBoot && !counts.contains_key(&PartitionType::Esp) {
        out.push(problem(
            "disk.partitions",
            "boot.loader is systemd-boot but the disk has no ESP",
            "add a partition with `type: esp` (e.g. size 256M), or set `boot.loader: none`",
        ));
    }
    if let Some(Size::Bytes(total)) = disk_size {
        let needed = explicit.saturating_add(DISK_OVERHEAD);
        if needed > total {
            out.push(problem(
                "disk.size",
                format!(
                    "the partitions need {} ({} plus {} for the partition table and alignment) \
                     but the disk is {}",
                    human(needed),
                    human(explicit),
                    human(DISK_OVERHEAD),
                    human(total)
                ),
                "make the disk larger, the partitions smaller, or use `size: auto`",
            ));
        }
    }
}

const SIZE_HELP: &str = "write a size like `512M`, `2G`, `4096` (bytes), `auto` or `rest`";

fn human(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes.is_multiple_of(1 << 30) && bytes > 0 {
        format!("{} GiB", bytes >> 30)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// An image path problem, or `None` when the path is absolute and clean.
fn bad_image_path(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("is relative; paths in the image are absolute (start with `/`)");
    }
    if path == "/" {
        return Some("is the image root itself");
    }
    let inner = path.trim_start_matches('/').trim_end_matches('/');
    for c in inner.split('/') {
        match c {
            "" => return Some("has an empty component (`//`)"),
            "." | ".." => {
                return Some("has a `.` or `..` component; paths cannot leave the image root");
            }
            _ if c.contains('\0') => return Some("contains a NUL byte"),
            _ => {}
        }
    }
    None
}

fn check_image_paths(recipe: &Recipe, out: &mut Vec<Problem>) {
    let r = &recipe.rootfs;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut check = |path: &str, at: String, out: &mut Vec<Problem>| {
        if let Some(why) = bad_image_path(path) {
            out.push(problem(
                format!("{at}.path"),
                format!("image path `{path}` {why}"),
                "write an absolute path such as /etc/motd",
            ));
            return;
        }
        let key = path.trim_end_matches('/').to_string();
        if let Some(first) = seen.get(&key) {
            out.push(problem(
                format!("{at}.path"),
                format!("image path `{path}` is given twice (first at {first})"),
                "each path may appear once across files, directories and symlinks",
            ));
        } else {
            seen.insert(key, at);
        }
    };
    for (i, f) in r.files.iter().enumerate() {
        let at = format!("rootfs.files[{i}]");
        check(&f.path, at.clone(), out);
        match (&f.content, &f.template) {
            (Some(_), Some(_)) => out.push(problem(
                at.clone(),
                format!("file `{}` has both `content` and `template`", f.path),
                "give one of them",
            )),
            (None, None) => out.push(problem(
                at.clone(),
                format!("file `{}` has neither `content` nor `template`", f.path),
                "give the text as `content:` or a template file as `template:`",
            )),
            _ => {}
        }
        check_mode(f.mode.as_deref(), &at, out);
        check_owner(f.owner.as_deref(), &at, out);
    }
    for (i, d) in r.directories.iter().enumerate() {
        let at = format!("rootfs.directories[{i}]");
        check(&d.path, at.clone(), out);
        check_mode(d.mode.as_deref(), &at, out);
        check_owner(d.owner.as_deref(), &at, out);
    }
    for (i, s) in r.symlinks.iter().enumerate() {
        let at = format!("rootfs.symlinks[{i}]");
        check(&s.path, at.clone(), out);
        if s.target.is_empty() {
            out.push(problem(
                format!("{at}.target"),
                format!("symlink `{}` has no target", s.path),
                "set `target:` to what the link points at",
            ));
        }
    }
}

/// Parse a mode string: octal digits, at most `7777`.
pub fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

fn check_mode(mode: Option<&str>, at: &str, out: &mut Vec<Problem>) {
    if let Some(m) = mode
        && parse_mode(m).is_none()
    {
        out.push(problem(
            format!("{at}.mode"),
            format!("mode `{m}` is not an octal permission value"),
            "write the mode as a quoted octal string such as \"0644\" or \"4755\"",
        ));
    }
}

fn check_owner(owner: Option<&str>, at: &str, out: &mut Vec<Problem>) {
    let Some(o) = owner else { return };
    let ok = match o.split_once(':') {
        Some((u, g)) => valid_account(u) && valid_account(g),
        None => valid_account(o),
    };
    if !ok {
        out.push(problem(
            format!("{at}.owner"),
            format!("owner `{o}` is not `user:group`"),
            "write `user:group` with names or numbers, e.g. `root:root` or `1000:1000`",
        ));
    }
}

fn valid_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn check_accounts(recipe: &Recipe, out: &mut Vec<Problem>) {
    let r = &recipe.rootfs;
    let mut names = BTreeSet::new();
    let mut uids: BTreeMap<u32, String> = BTreeMap::new();
    for (i, u) in r.users.iter().enumerate() {
        let at = format!("rootfs.users[{i}]");
        if !valid_account(&u.name) {
            out.push(problem(
                format!("{at}.name"),
                format!("invalid user name `{}`", u.name),
                "use letters, digits, `-`, `_` and `.` (at most 32)",
            ));
        } else if !names.insert(u.name.clone()) {
            out.push(problem(
                format!("{at}.name"),
                format!("user `{}` is defined twice", u.name),
                "each user once",
            ));
        }
        if let Some(uid) = u.uid {
            if let Some(other) = uids.get(&uid) {
                out.push(problem(
                    format!("{at}.uid"),
                    format!("uid {uid} of `{}` is already used by `{other}`", u.name),
                    "give each user its own uid, or leave `uid` out to allocate one",
                ));
            } else {
                uids.insert(uid, u.name.clone());
            }
        }
    }
    let mut gnames = BTreeSet::new();
    for (i, g) in r.groups.iter().enumerate() {
        if !valid_account(&g.name) || !gnames.insert(g.name.clone()) {
            out.push(problem(
                format!("rootfs.groups[{i}].name"),
                format!("invalid or repeated group name `{}`", g.name),
                "use letters, digits, `-`, `_` and `.`, each group once",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths() {
        assert!(bad_image_path("/etc/motd").is_none());
        for bad in ["etc/motd", "/etc/../x", "/a//b", "/", "/./a"] {
            assert!(bad_image_path(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("4755"), Some(0o4755));
        assert_eq!(parse_mode("0o755"), Some(0o755));
        assert_eq!(parse_mode("0999"), None);
        assert_eq!(parse_mode("17777"), None);
    }
}
