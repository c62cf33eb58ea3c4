//! Semantic checks on a merged recipe: what the schema's types cannot say (sizes that fit,
//! one root partition, absolute unique image paths, …). Pure: returns problems with the field path
//! they concern; `load` turns paths into `file:line:column`.

use super::diag::one_line;
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
    check_line_fields(recipe, &mut out);
    if let Some(publish) = &recipe.publish
        && publish.repository.trim().is_empty()
    {
        out.push(problem(
            "publish.repository",
            "publish.repository is empty",
            "name the OCI repository, e.g. `localhost:5000/images/minimal`",
        ));
    }
    if recipe.rootfs.base == crate::recipe::schema::RootfsBase::Busybox
        && !recipe.rootfs.packages.is_empty()
    {
        out.push(problem(
            "rootfs.packages",
            "rootfs.packages lists Debian packages, but a busybox root takes none (only a `base: debian` root installs them)",
            "set `rootfs.base: debian`, or remove rootfs.packages",
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
            format!(
                "set `kernel.package` (e.g. {}) or `kernel.build`",
                crate::debian::DEFAULT_KERNEL_PACKAGE
            ),
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
    if recipe.boot.secure_boot && !recipe.boot.uki {
        out.push(problem(
            "boot.secure_boot",
            "boot.secure_boot signs a unified kernel image, and boot.uki is not set: a kernel \
             and initramfs as separate files would not be covered by the signature",
            "add `uki: true` under `boot:`",
        ));
    }
    if recipe.boot.uki && loader != Loader::SystemdBoot {
        out.push(problem(
            "boot.uki",
            "boot.uki needs boot.loader systemd-boot, which finds the unified kernel image on \
             the ESP",
            "set `boot.loader: systemd-boot` (the default) and give the disk an ESP, or drop \
             `boot.uki`",
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
            _ if c.contains(|ch: char| ch.is_control()) => {
                return Some("contains a control character (a newline, NUL, escape, …)");
            }
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
                format!("image path `{}` {why}", one_line(path, 80)),
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
            format!(
                "mode `{}` is not an octal permission value",
                one_line(m, 80)
            ),
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
            format!("owner `{}` is not `user:group`", one_line(o, 80)),
            "write `user:group` with names or numbers, e.g. `root:root` or `1000:1000`",
        ));
    }
}

/// A user or group name (or number): letters, digits, `-`, `_` and `.`, at most 32, starting
/// with a letter, digit or `_` (so never an option such as `-x`, nor `.` or `..`).
fn valid_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
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
                format!("invalid user name `{}`", one_line(&u.name, 80)),
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
                format!("invalid or repeated group name `{}`", one_line(&g.name, 80)),
                "use letters, digits, `-`, `_` and `.`, each group once",
            ));
        }
    }
}

/// Why `text` cannot be written where a field goes, or `None`: a phrase that follows the value
/// in the message ("`x` contains …").
type FieldCheck = fn(&str) -> Option<String>;

/// A control character anywhere (a newline would start a new line of the file it lands in).
fn control_char(text: &str) -> Option<String> {
    text.chars()
        .find(|c| c.is_control())
        .map(|c| format!("contains the control character `{}`", c.escape_default()))
}

/// One field of passwd, group, shadow or gshadow: one line, no `:`.
fn bad_passwd_field(text: &str) -> Option<String> {
    control_char(text).or_else(|| {
        text.contains(':').then(|| {
            "contains `:`, which separates the fields of passwd, group and shadow".to_string()
        })
    })
}

/// A login shell or home directory: a passwd field and an absolute, normalised image path.
fn bad_account_path(text: &str) -> Option<String> {
    bad_passwd_field(text).or_else(|| bad_image_path(text).map(str::to_string))
}

/// The shadow password field: a crypt(3) hash (or a locked `!…`), never empty.
fn bad_password_hash(text: &str) -> Option<String> {
    if text.is_empty() {
        return Some("is empty, which lets the user log in without a password".into());
    }
    bad_passwd_field(text).or_else(|| {
        text.contains(char::is_whitespace)
            .then(|| "contains whitespace; crypt(3) hashes have none".to_string())
    })
}

/// A line of authorized_keys.
fn bad_key_line(text: &str) -> Option<String> {
    control_char(text)
}

/// A hostname: dot-separated labels of letters, digits and `-` (not at either end), at most 63
/// each and 64 in all (the kernel's limit).
fn bad_hostname(text: &str) -> Option<String> {
    if text.is_empty() || text.len() > 64 {
        return Some("is not 1 to 64 characters long".into());
    }
    for label in text.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Some(format!(
                "has the label `{}`; labels are letters, digits and `-` (not first or last)",
                one_line(label, 64)
            ));
        }
    }
    None
}

/// A time zone name under /usr/share/zoneinfo: relative, no `.` or `..` components, letters,
/// digits, `_`, `+` and `-`.
fn bad_timezone(text: &str) -> Option<String> {
    let ok = !text.is_empty()
        && text.len() <= 255
        && text.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+-".contains(c))
        });
    (!ok).then(|| {
        "is not a time zone name such as Etc/UTC or Europe/Berlin (letters, digits, `_`, `+`, `-`, \
         `/` between parts)"
            .to_string()
    })
}

/// A locale name such as `C.UTF-8`, `en_US.UTF-8` or `sr_RS@latin`.
fn bad_locale(text: &str) -> Option<String> {
    let ok = !text.is_empty()
        && text.len() <= 255
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
    (!ok).then(|| {
        "is not a locale name such as C.UTF-8 or en_US.UTF-8 (letters, digits, `_`, `.`, `@`, `-`)"
            .to_string()
    })
}

/// A data partition's mountpoint: an absolute, normalised image path other than `/`, and one
/// fstab field (no whitespace).
fn bad_mountpoint(text: &str) -> Option<String> {
    control_char(text)
        .or_else(|| {
            text.contains(char::is_whitespace)
                .then(|| "contains whitespace, which separates the fields of fstab".to_string())
        })
        .or_else(|| bad_image_path(text).map(str::to_string))
}

/// A Debian package name (policy 5.6.1): lowercase letters, digits, `+`, `-`, `.`, at least two,
/// starting with a letter or digit.
fn bad_package(text: &str) -> Option<String> {
    let ok = text.len() >= 2
        && text.len() <= 255
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        && text
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    (!ok).then(|| {
        "is not a Debian package name (lowercase letters, digits, `+`, `-`, `.`)".to_string()
    })
}

/// A suite or component of the archive (`bookworm`, `bookworm-backports`, `main`,
/// `non-free-firmware`): it becomes part of URLs and of mmdebstrap's arguments.
fn bad_archive_name(text: &str) -> Option<String> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
        && text
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    (!ok).then(|| {
        "is not a suite or component name (letters, digits, `.`, `_`, `+`, `-`, starting with a \
         letter or digit)"
            .to_string()
    })
}

/// mmdebstrap's variants.
const VARIANTS: [&str; 11] = [
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "-",
    "standard",
];

fn bad_variant(text: &str) -> Option<String> {
    (!VARIANTS.contains(&text)).then(|| format!("is not one of {}", VARIANTS.join(", ")))
}

/// Fields whose values land in line-based files (passwd, shadow, group, gshadow,
/// authorized_keys, hostname, hosts, timezone, locale, fstab) or in mmdebstrap's arguments:
/// one line each, no separators of their format, paths absolute and inside the image.
fn check_line_fields(recipe: &Recipe, out: &mut Vec<Problem>) {
    let check = |out: &mut Vec<Problem>,
                 path: String,
                 what: &str,
                 value: &str,
                 bad: FieldCheck,
                 help: &str| {
        if let Some(why) = bad(value) {
            out.push(problem(
                path,
                format!("{what} `{}` {why}", one_line(value, 80)),
                help,
            ));
        }
    };
    let r = &recipe.rootfs;
    for (i, u) in r.users.iter().enumerate() {
        let at = format!("rootfs.users[{i}]");
        if let Some(shell) = &u.shell {
            check(
                out,
                format!("{at}.shell"),
                "login shell",
                shell,
                bad_account_path,
                "write the shell's absolute path on one line, e.g. /bin/sh",
            );
        }
        if let Some(home) = &u.home {
            check(
                out,
                format!("{at}.home"),
                "home directory",
                home,
                bad_account_path,
                "write an absolute path inside the image other than /, e.g. /home/admin",
            );
        }
        if let Some(hash) = &u.password_hash {
            check(
                out,
                format!("{at}.password_hash"),
                "password hash",
                hash,
                bad_password_hash,
                "give a crypt(3) hash (mkpasswd -m yescrypt), or leave password_hash out to lock \
                 the password",
            );
        }
        for (k, key) in u.ssh_authorized_keys.iter().enumerate() {
            check(
                out,
                format!("{at}.ssh_authorized_keys[{k}]"),
                "SSH key",
                key,
                bad_key_line,
                "give each key as one list item on one line (`ssh-ed25519 AAAA… comment`)",
            );
        }
        let groups = u.group.iter().map(|g| (format!("{at}.group"), g));
        let extra = u
            .groups
            .iter()
            .enumerate()
            .map(|(k, g)| (format!("{at}.groups[{k}]"), g));
        for (path, g) in groups.chain(extra) {
            if !valid_account(g) {
                out.push(problem(
                    path,
                    format!("invalid group name `{}`", one_line(g, 80)),
                    "use letters, digits, `-`, `_` and `.` (at most 32)",
                ));
            }
        }
    }
    if let Some(hostname) = &r.hostname {
        check(
            out,
            "rootfs.hostname".into(),
            "hostname",
            hostname,
            bad_hostname,
            "write a hostname such as `web-1` or `web-1.example.org`",
        );
    }
    if let Some(zone) = &r.timezone {
        check(
            out,
            "rootfs.timezone".into(),
            "time zone",
            zone,
            bad_timezone,
            "name a zone under /usr/share/zoneinfo, e.g. Etc/UTC",
        );
    }
    if let Some(locale) = &r.locale {
        check(
            out,
            "rootfs.locale".into(),
            "locale",
            locale,
            bad_locale,
            "write a locale such as C.UTF-8",
        );
    }
    if let Some(suite) = &r.suite {
        check(
            out,
            "rootfs.suite".into(),
            "suite",
            suite,
            bad_archive_name,
            "name a Debian suite such as bookworm",
        );
    }
    if let Some(variant) = &r.variant {
        check(
            out,
            "rootfs.variant".into(),
            "variant",
            variant,
            bad_variant,
            "choose an mmdebstrap variant, e.g. minbase",
        );
    }
    for (i, c) in r.components.iter().enumerate() {
        check(
            out,
            format!("rootfs.components[{i}]"),
            "component",
            c,
            bad_archive_name,
            "name archive components such as main or contrib",
        );
    }
    for (i, p) in r.packages.iter().enumerate() {
        check(
            out,
            format!("rootfs.packages[{i}]"),
            "package",
            p,
            bad_package,
            "give one Debian package name per list item",
        );
    }
    if let Some(p) = &recipe.kernel.package {
        check(
            out,
            "kernel.package".into(),
            "kernel package",
            p,
            bad_package,
            &format!(
                "name a Debian kernel package, e.g. {}",
                crate::debian::DEFAULT_KERNEL_PACKAGE
            ),
        );
    }
    for (i, p) in recipe.disk.partitions.iter().enumerate() {
        if let Some(m) = &p.mountpoint {
            check(
                out,
                format!("disk.partitions[{i}].mountpoint"),
                "mountpoint",
                m,
                bad_mountpoint,
                "write an absolute path inside the image other than /, e.g. /srv",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busybox_root_takes_no_debian_packages() {
        let mut recipe = Recipe::default();
        recipe.rootfs.packages = vec!["tree".into()];
        let problems = validate(&recipe);
        assert!(
            problems
                .iter()
                .any(|p| p.path == "rootfs.packages" && p.help.contains("base: debian")),
            "{problems:?}"
        );
        recipe.rootfs.base = crate::recipe::schema::RootfsBase::Debian;
        assert!(
            !validate(&recipe)
                .iter()
                .any(|p| p.path == "rootfs.packages")
        );
    }

    #[test]
    fn image_paths() {
        assert!(bad_image_path("/etc/motd").is_none());
        for bad in [
            "etc/motd",
            "/etc/../x",
            "/a//b",
            "/",
            "/./a",
            "/etc/a\nb",
            "/a\u{1b}b",
        ] {
            assert!(bad_image_path(bad).is_some(), "{bad}");
        }
    }

    /// Run `check` over `(value, refused?)` rows; the failures, if any.
    fn table(check: FieldCheck, rows: &[(&str, bool)]) -> Vec<String> {
        rows.iter()
            .filter_map(|(value, refused)| {
                let got = check(value);
                (got.is_some() != *refused).then(|| format!("{value:?}: {got:?}"))
            })
            .collect()
    }

    #[test]
    fn line_fields_refuse_what_breaks_their_files() {
        let injected = "/bin/sh\nroot2::0:0::/:/bin/sh";
        let long_host = "a".repeat(65);
        /// A field, its check, and values with whether the check refuses them.
        type Table<'a> = (&'a str, FieldCheck, Vec<(&'a str, bool)>);
        let tables: Vec<Table> = vec![
            (
                "shell and home",
                bad_account_path,
                vec![
                    ("/bin/sh", false),
                    ("/home/admin", false),
                    ("/usr/sbin/nologin", false),
                    (injected, true),
                    ("/bin/sh\r", true),
                    ("/bin/\u{1b}[2Jsh", true),
                    ("/bin/sh\u{7f}", true),
                    ("/home/a:b", true),
                    ("bin/sh", true),
                    ("", true),
                    ("/", true),
                    ("/home/../etc", true),
                    ("/home/./a", true),
                    ("/home//a", true),
                    ("/home/a\0", true),
                ],
            ),
            (
                "password hash",
                bad_password_hash,
                vec![
                    ("$6$salt$abc./XYZ", false),
                    ("$y$j9T$salt$hash", false),
                    ("!", false),
                    ("!$6$salt$abc", false),
                    ("", true),
                    ("$6$a:b", true),
                    ("$6$a\nroot::0", true),
                    ("$6$a b", true),
                ],
            ),
            (
                "authorized key",
                bad_key_line,
                vec![
                    ("ssh-ed25519 AAAAC3Nza user@host", false),
                    ("from=\"10.0.0.0/8\" ssh-ed25519 AAAA x", false),
                    ("ssh-ed25519 AAAA\nssh-rsa BBBB evil", true),
                    ("ssh-ed25519 AAAA\r", true),
                    ("ssh-ed25519\tAAAA", true),
                ],
            ),
            (
                "hostname",
                bad_hostname,
                vec![
                    ("web-1", false),
                    ("web-1.example.org", false),
                    ("a", false),
                    ("", true),
                    ("-web", true),
                    ("web-", true),
                    ("web_1", true),
                    ("web 1", true),
                    ("web\n127.0.0.1 evil", true),
                    ("a..b", true),
                    (&long_host, true),
                ],
            ),
            (
                "time zone",
                bad_timezone,
                vec![
                    ("Etc/UTC", false),
                    ("America/Argentina/Buenos_Aires", false),
                    ("Etc/GMT+5", false),
                    ("EST5EDT", false),
                    ("", true),
                    ("/etc/shadow", true),
                    ("../../etc/shadow", true),
                    ("Etc/../../x", true),
                    ("Etc//UTC", true),
                    ("Etc/UTC\nx", true),
                    ("Etc/U TC", true),
                ],
            ),
            (
                "locale",
                bad_locale,
                vec![
                    ("C.UTF-8", false),
                    ("en_US.UTF-8", false),
                    ("sr_RS@latin", false),
                    ("", true),
                    ("C.UTF-8\nLC_ALL=x", true),
                    ("en_US' ; rm -rf / ; '", true),
                    ("a b", true),
                ],
            ),
            (
                "mountpoint",
                bad_mountpoint,
                vec![
                    ("/srv", false),
                    ("/var/lib/data", false),
                    ("/", true),
                    ("srv", true),
                    ("/srv/../..", true),
                    ("/srv/./x", true),
                    ("/srv//x", true),
                    ("/srv data", true),
                    ("/srv\tdata", true),
                    ("/srv\n/dev/sda1 / ext4", true),
                ],
            ),
            (
                "package",
                bad_package,
                vec![
                    ("systemd", false),
                    ("linux-image-cloud-amd64", false),
                    ("libstdc++6", false),
                    ("g++", false),
                    ("x", true),
                    ("Systemd", true),
                    ("a,b", true),
                    ("-x", true),
                    ("--customize-hook=sh", true),
                    ("a b", true),
                ],
            ),
            (
                "suite and component",
                bad_archive_name,
                vec![
                    ("bookworm", false),
                    ("bookworm-backports", false),
                    ("non-free-firmware", false),
                    ("", true),
                    ("--customize-hook=touch /x", true),
                    ("bookworm/../x", true),
                    ("main,contrib", true),
                ],
            ),
            (
                "variant",
                bad_variant,
                vec![
                    ("minbase", false),
                    ("important", false),
                    ("huge", true),
                    ("", true),
                ],
            ),
        ];
        let mut failures = Vec::new();
        for (name, check, rows) in &tables {
            for f in table(*check, rows) {
                failures.push(format!("{name}: {f}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn account_names_never_look_like_options_or_dots() {
        for ok in ["admin", "_apt", "www-data", "a.b", "1000"] {
            assert!(valid_account(ok), "{ok}");
        }
        for bad in [
            "",
            "-x",
            ".",
            "..",
            ".hidden",
            "a:b",
            "a\nb",
            "a b",
            &"a".repeat(33),
        ] {
            assert!(!valid_account(bad), "{bad:?}");
        }
    }

    #[test]
    fn every_line_field_is_checked_at_its_path() {
        use crate::recipe::schema::{Partition, UserSpec};
        let mut recipe = Recipe::default();
        let bad = "x\ny".to_string();
        recipe.rootfs.users = vec![UserSpec {
            name: "u".into(),
            group: Some(bad.clone()),
            groups: vec!["ok".into(), bad.clone()],
            home: Some(bad.clone()),
            shell: Some(bad.clone()),
            password_hash: Some(bad.clone()),
            ssh_authorized_keys: vec!["ok".into(), bad.clone()],
            ..UserSpec::default()
        }];
        recipe.rootfs.hostname = Some(bad.clone());
        recipe.rootfs.timezone = Some(bad.clone());
        recipe.rootfs.locale = Some(bad.clone());
        recipe.rootfs.suite = Some(bad.clone());
        recipe.rootfs.variant = Some(bad.clone());
        recipe.rootfs.components = vec![bad.clone()];
        recipe.rootfs.packages = vec![bad.clone()];
        recipe.kernel.package = Some(bad.clone());
        recipe.disk.partitions = vec![Partition {
            mountpoint: Some(bad.clone()),
            ..Partition::default()
        }];
        let mut out = Vec::new();
        check_line_fields(&recipe, &mut out);
        let paths: Vec<&str> = out.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "rootfs.users[0].shell",
                "rootfs.users[0].home",
                "rootfs.users[0].password_hash",
                "rootfs.users[0].ssh_authorized_keys[1]",
                "rootfs.users[0].group",
                "rootfs.users[0].groups[1]",
                "rootfs.hostname",
                "rootfs.timezone",
                "rootfs.locale",
                "rootfs.suite",
                "rootfs.variant",
                "rootfs.components[0]",
                "rootfs.packages[0]",
                "kernel.package",
                "disk.partitions[0].mountpoint",
            ]
        );
        for p in &out {
            assert!(!p.message.contains('\n'), "{}", p.message);
            assert!(p.message.contains("x\\ny"), "{}", p.message);
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
