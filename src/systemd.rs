//! systemd configuration of a Debian image, applied to its Tree as `systemctl` and first-boot
//! tools would, without running anything: enabled units (their `[Install]` section's WantedBy=,
//! RequiredBy=, Alias= and Also=) and masked units, the systemd-networkd DHCP configuration,
//! an empty `/etc/machine-id` (set on first boot), no SSH host keys (generated on first boot by
//! a unit kiln adds), locale and time zone, and the verification unit that prints
//! `systemctl is-system-running --wait` with the build's marker on the serial console. Also the
//! check of that line after a boot: [`check_system_state`].

use crate::recipe::schema::RootfsBase;
use crate::rootfs::{RootfsSpec, shell_quote};
use crate::tree::{Content, Entry, EntryKind, Tree, TreeError, TreePath};
use serde_json::json;

/// Where unit files are looked up, first match wins (as systemd's search path, /etc first).
const UNIT_DIRS: [&str; 3] = [
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];

/// The unit kiln adds to print the system state with the marker.
pub const VERIFY_UNIT: &str = "kiln-verify.service";
/// The unit kiln adds to generate SSH host keys on first boot.
pub const SSH_KEYS_UNIT: &str = "kiln-ssh-host-keys.service";
/// What the verification unit prints before the state (which comes before the marker, so that
/// the line is complete up to the marker when kiln reads it).
pub const STATE_PREFIX: &str = "system-state=";
/// What the verification unit prints before each failed unit.
pub const FAILED_PREFIX: &str = "kiln-failed-unit: ";

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(
        "services: unit `{unit}` does not exist in the image (looked in /etc/systemd/system and \
         /lib/systemd/system); is the package that ships it in rootfs.packages?"
    )]
    UnknownUnit { unit: String },
    #[error(
        "services.enable: unit `{unit}` has no [Install] section (it is static or pulled in by \
         another unit), so there is nothing to enable"
    )]
    NotInstallable { unit: String },
    #[error("rootfs.timezone `{zone}`: /usr/share/zoneinfo/{zone} is not in the image")]
    UnknownTimezone { zone: String },
    #[error("template `{name}`: {message}")]
    Template { name: String, message: String },
    #[error("{unit}: {message}")]
    BadUnit { unit: String, message: String },
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// What a verification boot of a Debian image printed, when it did not reach `running`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the system booted but is `{state}`, not `running`; failed units: {}; serial log: {log}",
    if failed.is_empty() { "(none listed)".to_string() } else { failed.join(", ") }
)]
pub struct SystemStateError {
    pub state: String,
    pub failed: Vec<String>,
    pub log: String,
}

fn file_text(tree: &Tree, path: &TreePath) -> Option<String> {
    let mut seen = 0;
    let mut path = path.clone();
    loop {
        match &tree.get(&path)?.kind {
            EntryKind::File(c) => {
                return crate::tree::read_content(c)
                    .ok()
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
            }
            EntryKind::HardLink { target } => path = target.clone(),
            EntryKind::Symlink { target } => {
                let next = if target.starts_with('/') {
                    TreePath::new(target).ok()?
                } else {
                    path.parent()?.join(target).ok()?
                };
                path = resolve_usr(tree, &next);
            }
            _ => return None,
        }
        seen += 1;
        if seen > 8 {
            return None;
        }
    }
}

/// `lib/...` → `usr/lib/...` when `/lib` is a symlink (merged /usr).
fn resolve_usr(tree: &Tree, path: &TreePath) -> TreePath {
    for top in ["lib", "bin", "sbin"] {
        let is_link = TreePath::new(top)
            .ok()
            .and_then(|p| {
                tree.get(&p)
                    .map(|e| matches!(e.kind, EntryKind::Symlink { .. }))
            })
            .unwrap_or(false);
        if is_link
            && let Some(rest) = path.as_str().strip_prefix(&format!("{top}/"))
            && let Ok(p) = TreePath::new(&format!("usr/{top}/{rest}"))
        {
            return p;
        }
    }
    path.clone()
}

/// The unit file for `unit` (a template instance `a@b.service` is found as `a@.service`):
/// its path in the tree and its text.
fn find_unit(tree: &Tree, unit: &str) -> Option<(TreePath, String)> {
    let template = match unit.split_once('@') {
        Some((prefix, rest)) if !rest.starts_with('.') => {
            let suffix = rest.rsplit_once('.').map(|(_, s)| s).unwrap_or("service");
            Some(format!("{prefix}@.{suffix}"))
        }
        _ => None,
    };
    for name in std::iter::once(unit.to_string()).chain(template) {
        for dir in UNIT_DIRS {
            let Ok(p) = TreePath::new(&format!("{dir}/{name}")) else {
                continue;
            };
            let p = resolve_usr(tree, &p);
            if let Some(text) = file_text(tree, &p) {
                return Some((p, text));
            }
        }
    }
    None
}

/// Values of `key=` lines in the `[Install]` section (space-separated lists split).
fn install_values(text: &str, key: &str) -> Vec<String> {
    let mut in_install = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            out.extend(v.split_whitespace().map(str::to_string));
        }
    }
    out
}

fn has_install(text: &str) -> bool {
    ["WantedBy", "RequiredBy", "Alias", "Also", "UpheldBy"]
        .iter()
        .any(|k| !install_values(text, k).is_empty())
}

/// The path systemctl would write in a link to the unit file at `path` (Debian's `/lib/…` form
/// for files under `/usr/lib/systemd/system`).
fn link_target(path: &TreePath) -> String {
    match path.as_str().strip_prefix("usr/lib/systemd/system/") {
        Some(rest) => format!("/lib/systemd/system/{rest}"),
        None => path.to_string(),
    }
}

/// Enable `unit` as `systemctl enable` does: a link in `<target>.wants/` or `.requires/` for
/// each WantedBy=/RequiredBy=, a link for each Alias=, and the same for each Also= unit.
pub fn enable_unit(tree: &mut Tree, unit: &str) -> Result<(), SystemdError> {
    let mut todo = vec![unit.to_string()];
    let mut done: Vec<String> = Vec::new();
    while let Some(name) = todo.pop() {
        if done.contains(&name) {
            continue;
        }
        done.push(name.clone());
        let (path, text) = find_unit(tree, &name)
            .ok_or_else(|| SystemdError::UnknownUnit { unit: name.clone() })?;
        if !has_install(&text) {
            if name == unit {
                return Err(SystemdError::NotInstallable { unit: name });
            }
            continue;
        }
        let target = link_target(&path);
        let instance_name = if name.contains("@.") {
            install_values(&text, "DefaultInstance")
                .first()
                .map(|i| name.replacen("@.", &format!("@{i}."), 1))
                .unwrap_or_else(|| name.clone())
        } else {
            name.clone()
        };
        for (key, dir) in [("WantedBy", "wants"), ("RequiredBy", "requires")] {
            for t in install_values(&text, key) {
                let link = format!("/etc/systemd/system/{t}.{dir}/{instance_name}");
                tree.add(&link, Entry::symlink(target.clone()))?;
            }
        }
        for alias in install_values(&text, "Alias") {
            tree.add(
                &format!("/etc/systemd/system/{alias}"),
                Entry::symlink(target.clone()),
            )?;
        }
        todo.extend(install_values(&text, "Also"));
    }
    Ok(())
}

/// Mask `unit`: `/etc/systemd/system/<unit>` → `/dev/null`.
pub fn mask_unit(tree: &mut Tree, unit: &str) -> Result<(), SystemdError> {
    if find_unit(tree, unit).is_none() {
        return Err(SystemdError::UnknownUnit {
            unit: unit.to_string(),
        });
    }
    let path = TreePath::new(&format!("etc/systemd/system/{unit}"))?;
    tree.remove(&path);
    tree.insert(path, Entry::symlink("/dev/null"))?;
    Ok(())
}

fn render(
    spec: &RootfsSpec<'_>,
    name: &str,
    ctx: serde_json::Value,
) -> Result<String, SystemdError> {
    spec.templates
        .render(name, ctx)
        .map_err(|message| SystemdError::Template {
            name: name.to_string(),
            message,
        })
}

/// Apply the recipe's systemd configuration and kiln's first-boot and verification units.
pub fn configure(tree: &mut Tree, spec: &RootfsSpec<'_>) -> Result<(), SystemdError> {
    let r = spec.rootfs;
    // Set on first boot (systemd sees an empty file and initializes it).
    tree.add(
        "/etc/machine-id",
        Entry::file(Content::inline(Vec::new()), 0o444),
    )?;
    let dbus_id = TreePath::new("var/lib/dbus/machine-id")?;
    if matches!(
        tree.get(&dbus_id).map(|e| &e.kind),
        Some(EntryKind::File(_))
    ) {
        tree.insert(dbus_id, Entry::symlink("/etc/machine-id"))?;
    }
    // No host keys in the image: every machine makes its own on first boot.
    let ssh_dir = TreePath::new("etc/ssh")?;
    let keys: Vec<TreePath> = tree
        .children(&ssh_dir)
        .filter(|(p, _)| p.file_name().starts_with("ssh_host_"))
        .map(|(p, _)| p.clone())
        .collect();
    for k in keys {
        tree.remove(&k);
    }
    let has_sshd = find_unit(tree, "ssh.service").is_some();
    if has_sshd {
        tree.add(
            &format!("/etc/systemd/system/{SSH_KEYS_UNIT}"),
            Entry::file(
                Content::inline(render(spec, "debian/ssh-host-keys.service.j2", json!({}))?),
                0o644,
            ),
        )?;
        enable_unit(tree, SSH_KEYS_UNIT)?;
    }
    // No initrd in /boot (kiln makes it): drop Debian's links to one.
    for link in ["initrd.img", "initrd.img.old"] {
        tree.remove(&TreePath::new(link)?);
    }
    if let Some(locale) = &r.locale {
        tree.add(
            "/etc/default/locale",
            Entry::file(Content::inline(format!("LANG={locale}\n")), 0o644),
        )?;
    }
    if let Some(zone) = &r.timezone {
        let data = TreePath::new(&format!("usr/share/zoneinfo/{zone}"))?;
        if tree.get(&data).is_none() {
            return Err(SystemdError::UnknownTimezone { zone: zone.clone() });
        }
        tree.add(
            "/etc/localtime",
            Entry::symlink(format!("/usr/share/zoneinfo/{zone}")),
        )?;
        tree.add(
            "/etc/timezone",
            Entry::file(Content::inline(format!("{zone}\n")), 0o644),
        )?;
    }
    let networkd = r
        .services
        .enable
        .iter()
        .any(|u| u == "systemd-networkd.service" || u == "systemd-networkd");
    let network_dir = TreePath::new("etc/systemd/network")?;
    let own_network = r.files.iter().any(|f| {
        f.path
            .trim_start_matches('/')
            .starts_with("etc/systemd/network/")
    });
    if networkd && !own_network {
        tree.insert(
            network_dir.join("20-kiln-dhcp.network")?,
            Entry::file(
                Content::inline(render(spec, "debian/dhcp.network.j2", json!({}))?),
                0o644,
            ),
        )?;
    }
    for unit in &r.services.enable {
        enable_unit(tree, &unit_name(unit))?;
    }
    for unit in &r.services.mask {
        mask_unit(tree, &unit_name(unit))?;
    }
    // The verification unit: prints the state and the marker once the boot has finished.
    let expect = spec.expect;
    let script = render(
        spec,
        "debian/kiln-verify.sh.j2",
        json!({
            "expect_shell": shell_quote(expect),
            "state_prefix": STATE_PREFIX,
            "failed_prefix": FAILED_PREFIX,
        }),
    )?;
    tree.add(
        "/usr/local/lib/kiln/verify",
        Entry::file(Content::inline(script), 0o755),
    )?;
    tree.add(
        &format!("/etc/systemd/system/{VERIFY_UNIT}"),
        Entry::file(
            Content::inline(render(spec, "debian/kiln-verify.service.j2", json!({}))?),
            0o644,
        ),
    )?;
    enable_unit(tree, VERIFY_UNIT)?;
    Ok(())
}

/// `sshd` → `sshd.service`; names with a unit suffix are kept.
fn unit_name(name: &str) -> String {
    const SUFFIXES: [&str; 11] = [
        ".service",
        ".socket",
        ".target",
        ".timer",
        ".mount",
        ".path",
        ".slice",
        ".scope",
        ".device",
        ".swap",
        ".automount",
    ];
    if SUFFIXES.iter().any(|s| name.ends_with(s)) {
        name.to_string()
    } else {
        format!("{name}.service")
    }
}

/// Whether a recipe with this `rootfs:` builds a systemd image whose verification reads the
/// system state.
pub fn reports_state(rootfs: &crate::recipe::schema::Rootfs) -> bool {
    rootfs.base == RootfsBase::Debian
}

/// Check the marker line of a Debian boot: `system-state=running <marker>` passes; any other state
/// fails with the failed units the verification unit listed on the console (`serial` is the
/// serial log's text).
pub fn check_system_state(
    marker_line: &str,
    serial: &str,
    log_name: &str,
) -> Result<(), SystemStateError> {
    let state = marker_line
        .rsplit_once(STATE_PREFIX)
        .map(|(_, s)| s.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_else(|| "unknown (no system-state= on the marker line)".to_string());
    if state == "running" {
        return Ok(());
    }
    let mut failed: Vec<String> = Vec::new();
    for line in serial.lines() {
        if let Some((_, rest)) = line.split_once(FAILED_PREFIX) {
            let unit = rest.split_whitespace().next().unwrap_or("").to_string();
            if !unit.is_empty() && !failed.contains(&unit) {
                failed.push(unit);
            }
        }
    }
    Err(SystemStateError {
        state,
        failed,
        log: log_name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_tree() -> Tree {
        let mut t = Tree::new();
        t.add("/lib", Entry::symlink("usr/lib")).unwrap();
        t.add(
            "/usr/lib/systemd/system/a.service",
            Entry::file(
                Content::inline(
                    "[Unit]\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n\
                     Alias=b.service\nAlso=c.socket\n",
                ),
                0o644,
            ),
        )
        .unwrap();
        t.add(
            "/usr/lib/systemd/system/c.socket",
            Entry::file(
                Content::inline("[Socket]\n[Install]\nWantedBy=sockets.target\n"),
                0o644,
            ),
        )
        .unwrap();
        t.add(
            "/usr/lib/systemd/system/static.service",
            Entry::file(Content::inline("[Service]\nExecStart=/bin/true\n"), 0o644),
        )
        .unwrap();
        t
    }

    #[test]
    fn enable_follows_install_section() {
        let mut t = unit_tree();
        enable_unit(&mut t, "a.service").unwrap();
        let link = |p: &str| match &t.get(&TreePath::new(p).unwrap()).unwrap().kind {
            EntryKind::Symlink { target } => target.clone(),
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(
            link("/etc/systemd/system/multi-user.target.wants/a.service"),
            "/lib/systemd/system/a.service"
        );
        assert_eq!(
            link("/etc/systemd/system/b.service"),
            "/lib/systemd/system/a.service"
        );
        assert_eq!(
            link("/etc/systemd/system/sockets.target.wants/c.socket"),
            "/lib/systemd/system/c.socket"
        );
    }

    #[test]
    fn unknown_static_and_mask() {
        let mut t = unit_tree();
        assert!(matches!(
            enable_unit(&mut t, "nope.service"),
            Err(SystemdError::UnknownUnit { .. })
        ));
        assert!(matches!(
            enable_unit(&mut t, "static.service"),
            Err(SystemdError::NotInstallable { .. })
        ));
        mask_unit(&mut t, "static.service").unwrap();
        assert!(matches!(
            mask_unit(&mut t, "nope.service"),
            Err(SystemdError::UnknownUnit { .. })
        ));
        assert_eq!(unit_name("sshd"), "sshd.service");
        assert_eq!(unit_name("x.timer"), "x.timer");
    }

    #[test]
    fn state_check() {
        assert!(
            check_system_state("verify[1]: system-state=running kiln-boot-ok X", "", "log").is_ok()
        );
        let serial = "kiln-failed-unit: bad.service loaded failed failed\nnoise\n";
        let err =
            check_system_state("system-state=degraded kiln-boot-ok X", serial, "log").unwrap_err();
        assert_eq!(err.state, "degraded");
        assert_eq!(err.failed, ["bad.service"]);
        assert!(err.to_string().contains("bad.service"));
    }
}
