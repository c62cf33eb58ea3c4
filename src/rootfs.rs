//! The root filesystem Tree: a base (the busybox-static userland here; the Debian base is in
//! [`crate::debian`]) plus what the recipe adds — files, directories, symlinks, users and groups — with every timestamp set to
//! SOURCE_DATE_EPOCH. Pure Tree work: packages arrive already read into Trees.

use crate::recipe::validate::parse_mode;
use crate::recipe::{Loaded, TemplateSet};
use crate::tree::{Content, Entry, EntryKind, Tree, TreeError, TreePath};
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the busybox-static package has no /bin/busybox; is the package right?")]
    NoBusybox,
    #[error("template `{name}`: {message}")]
    Template { name: String, message: String },
    #[error("{path}: owner `{owner}` names an unknown {what}; define it under rootfs.users/groups")]
    UnknownOwner {
        path: String,
        owner: String,
        what: &'static str,
    },
    #[error("user `{user}`: uid {uid} is already used by `{other}`")]
    UidClash {
        user: String,
        uid: u32,
        other: String,
    },
    #[error("user `{user}` already exists in the base image; choose another name")]
    UserExists { user: String },
    #[error(
        "user `{user}`: supplementary group `{group}` is neither in rootfs.groups nor in the base \
         image"
    )]
    UnknownGroup { user: String, group: String },
    #[error(transparent)]
    Systemd(#[from] crate::systemd::SystemdError),
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// Where the image's partitions are, for /etc/fstab.
#[derive(Debug, Clone)]
pub struct Mounts {
    pub root_partuuid: String,
    pub esp_partuuid: Option<String>,
    /// `disk.verity`: the root is `/dev/mapper/root`, read-only (kiln's initramfs set it up).
    pub verity: bool,
}

/// A user or group with its numeric id settled.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// Supplementary members (groups only).
    pub members: Vec<String>,
    /// The shadow password field: a crypt(3) hash, or `!` (locked).
    pub password: String,
}

/// What assembling a root filesystem (busybox or Debian, with its systemd configuration) reads
/// of a recipe.
#[derive(Debug, Clone, Copy)]
pub struct RootfsSpec<'a> {
    /// The image name: the hostname when `rootfs.hostname` is not set.
    pub name: &'a str,
    pub rootfs: &'a crate::recipe::schema::Rootfs,
    /// The line the image prints once it has booted (`verify.expect`).
    pub expect: &'a str,
    /// The application command of a busybox image (`deploy.run`).
    pub deploy_run: Option<&'a str>,
    /// SOURCE_DATE_EPOCH: every mtime.
    pub epoch: i64,
    /// Rendered text of every `rootfs.files[].template`, by image path.
    pub rendered_files: &'a BTreeMap<String, String>,
    /// For the files kiln renders itself (init, passwd, fstab, units).
    pub templates: TemplateSet<'a>,
}

impl<'a> RootfsSpec<'a> {
    pub fn of(loaded: &'a Loaded) -> Self {
        let recipe = &loaded.recipe;
        RootfsSpec {
            name: &recipe.name,
            rootfs: &recipe.rootfs,
            expect: recipe.verify.expect.as_deref().unwrap_or_default(),
            deploy_run: recipe.deploy.as_ref().and_then(|d| d.run.as_deref()),
            epoch: loaded.source_date_epoch,
            rendered_files: &loaded.rendered_files,
            templates: loaded.template_set(),
        }
    }

    /// `rootfs.hostname`, else the image name.
    pub fn hostname(&self) -> String {
        self.rootfs
            .hostname
            .clone()
            .unwrap_or_else(|| self.name.to_string())
    }
}

/// Build the root Tree of a `rootfs.base: busybox` recipe.
pub fn busybox_rootfs(
    spec: &RootfsSpec<'_>,
    busybox: &Tree,
    mounts: &Mounts,
) -> Result<Tree, RootfsError> {
    let epoch = spec.epoch;
    let render = |name: &str, extra: serde_json::Value| {
        spec.templates
            .render(name, extra)
            .map_err(|message| RootfsError::Template {
                name: name.to_string(),
                message,
            })
    };
    let mut tree = Tree::new();
    let bin = TreePath::new("/bin/busybox")?;
    let busybox_entry = busybox
        .get(&bin)
        .filter(|e| matches!(e.kind, EntryKind::File(_)))
        .ok_or(RootfsError::NoBusybox)?;
    for dir in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/etc",
        "/dev",
        "/proc",
        "/sys",
        "/run",
        "/tmp",
        "/root",
        "/home",
        "/var",
        "/var/log",
        "/mnt",
        "/boot",
        "/boot/efi",
        "/lib",
    ] {
        let mode = match dir {
            "/tmp" => 0o1777,
            "/root" => 0o700,
            _ => 0o755,
        };
        tree.add(dir, Entry::dir(mode))?;
    }
    tree.insert(bin.clone(), busybox_entry.clone().owner(0, 0))?;
    let applets = render("busybox/applets.txt", json!({}))?;
    for line in applets.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line == "bin/busybox" {
            continue;
        }
        let path = TreePath::new(line)?;
        if tree.get(&path).is_some() {
            continue;
        }
        // Relative links so the tree works wherever it is mounted.
        let up = "../".repeat(path.depth() - 1);
        tree.insert(path, Entry::symlink(format!("{up}bin/busybox")))?;
    }

    let (users, groups) = accounts(spec)?;
    let hostname = spec.hostname();
    let expect = spec.expect;
    let ctx = json!({
        "users": users,
        "groups": groups,
        "expect": expect,
        "expect_shell": shell_quote(expect),
        "deploy_run": spec
            .deploy_run
            .filter(|r| !r.trim().is_empty())
            .map(shell_quote),
        "root_partuuid": mounts.root_partuuid,
        "esp_partuuid": mounts.esp_partuuid,
        "hostname": hostname,
    });
    let init = render("busybox/init.sh.j2", ctx.clone())?;
    tree.add("/sbin/init", Entry::file(Content::inline(init), 0o755))?;
    tree.add(
        "/etc/passwd",
        Entry::file(
            Content::inline(render("busybox/passwd.j2", ctx.clone())?),
            0o644,
        ),
    )?;
    tree.add(
        "/etc/group",
        Entry::file(
            Content::inline(render("busybox/group.j2", ctx.clone())?),
            0o644,
        ),
    )?;
    let mut shadow = String::from("root:*:19000:0:99999:7:::\n");
    for u in &users {
        shadow.push_str(&format!("{}:{}:19000:0:99999:7:::\n", u.name, u.password));
    }
    tree.add("/etc/shadow", Entry::file(Content::inline(shadow), 0o600))?;
    tree.add(
        "/etc/fstab",
        Entry::file(
            Content::inline(render("busybox/fstab.j2", ctx.clone())?),
            0o644,
        ),
    )?;
    tree.add(
        "/etc/hostname",
        Entry::file(Content::inline(format!("{hostname}\n")), 0o644),
    )?;
    // Device nodes needed before devtmpfs is mounted.
    tree.add(
        "/dev/console",
        Entry::new(EntryKind::CharDevice { major: 5, minor: 1 }, 0o600),
    )?;
    tree.add(
        "/dev/null",
        Entry::new(EntryKind::CharDevice { major: 1, minor: 3 }, 0o666),
    )?;
    add_homes(&mut tree, spec, &users)?;
    apply_recipe_entries(&mut tree, spec, &users, &groups)?;
    for (_, entry) in tree.iter_mut() {
        entry.mtime = epoch;
    }
    tree.validate()?;
    Ok(tree)
}

/// Each user's home directory (0750) and `~/.ssh/authorized_keys` (0600, in a 0700 `.ssh`),
/// owned by the user.
pub fn add_homes(
    tree: &mut Tree,
    spec: &RootfsSpec<'_>,
    users: &[Account],
) -> Result<(), RootfsError> {
    for u in users {
        let home = TreePath::new(&u.home)?;
        tree.insert(home.clone(), Entry::dir(0o750).owner(u.uid, u.gid))?;
        let user = spec.rootfs.users.iter().find(|s| s.name == u.name);
        if let Some(user) = user
            && !user.ssh_authorized_keys.is_empty()
        {
            let ssh = home.join(".ssh")?;
            tree.insert(ssh.clone(), Entry::dir(0o700).owner(u.uid, u.gid))?;
            let mut keys = user.ssh_authorized_keys.join("\n");
            keys.push('\n');
            tree.insert(
                ssh.join("authorized_keys")?,
                Entry::file(Content::inline(keys), 0o600).owner(u.uid, u.gid),
            )?;
        }
    }
    Ok(())
}

/// Files, directories and symlinks from the recipe, over whatever the base put there.
pub fn apply_recipe_entries(
    tree: &mut Tree,
    spec: &RootfsSpec<'_>,
    users: &[Account],
    groups: &[Account],
) -> Result<(), RootfsError> {
    let r = spec.rootfs;
    for d in &r.directories {
        let (uid, gid) = owner(d.owner.as_deref(), &d.path, users, groups)?;
        let mode = d.mode.as_deref().and_then(parse_mode).unwrap_or(0o755);
        tree.add(&d.path, Entry::dir(mode).owner(uid, gid))?;
    }
    for f in &r.files {
        let (uid, gid) = owner(f.owner.as_deref(), &f.path, users, groups)?;
        let mode = f.mode.as_deref().and_then(parse_mode).unwrap_or(0o644);
        let text = match (&f.content, spec.rendered_files.get(&f.path)) {
            (Some(c), _) => c.clone(),
            (None, Some(rendered)) => rendered.clone(),
            (None, None) => String::new(),
        };
        tree.add(
            &f.path,
            Entry::file(Content::inline(text), mode).owner(uid, gid),
        )?;
    }
    for s in &r.symlinks {
        tree.add(&s.path, Entry::symlink(s.target.clone()))?;
    }
    Ok(())
}

/// Users and groups with ids settled: given ids kept, others allocated from 1000 up in recipe
/// order; each user gets a group of its own name unless it names one.
fn accounts(spec: &RootfsSpec<'_>) -> Result<(Vec<Account>, Vec<Account>), RootfsError> {
    let users = BTreeMap::from([(0, "root".to_string()), (65534, "nobody".to_string())]);
    let groups = BTreeMap::from([(0, "root".to_string()), (65534, "nogroup".to_string())]);
    accounts_over(spec.rootfs, users, groups, "/bin/sh")
}

/// Users and groups of the recipe over a base that already has `base_users` (uid → name) and
/// `base_groups` (gid → name): a given uid that a base or earlier user holds is an error, as is
/// a user name the base has; free ids are allocated from 1000 up. A base group named as a
/// supplementary group is returned (with the new members) so that the caller can add them.
pub fn accounts_over(
    r: &crate::recipe::schema::Rootfs,
    base_users: BTreeMap<u32, String>,
    base_groups: BTreeMap<u32, String>,
    default_shell: &str,
) -> Result<(Vec<Account>, Vec<Account>), RootfsError> {
    let mut groups: Vec<Account> = Vec::new();
    let mut used_gids = base_groups.clone();
    for u in &r.users {
        if base_users.values().any(|n| n == &u.name) {
            return Err(RootfsError::UserExists {
                user: u.name.clone(),
            });
        }
    }
    // Base groups a recipe user refers to, so their gid and members are known.
    for (gid, name) in &base_groups {
        let referred = r.users.iter().any(|u| {
            u.group.as_deref() == Some(name.as_str()) || u.groups.iter().any(|g| g == name)
        });
        if referred && !r.groups.iter().any(|g| &g.name == name) {
            groups.push(Account {
                name: name.clone(),
                uid: *gid,
                gid: *gid,
                home: String::new(),
                shell: String::new(),
                members: Vec::new(),
                password: String::new(),
            });
        }
    }
    let next_free = |used: &BTreeMap<u32, String>| (1000..).find(|id| !used.contains_key(id));
    for g in &r.groups {
        let gid = match g.gid {
            Some(id) => id,
            None => next_free(&used_gids).unwrap_or(60000),
        };
        used_gids.insert(gid, g.name.clone());
        groups.push(Account {
            name: g.name.clone(),
            uid: gid,
            gid,
            home: String::new(),
            shell: String::new(),
            members: Vec::new(),
            password: String::new(),
        });
    }
    let mut users: Vec<Account> = Vec::new();
    let mut used_uids = base_users;
    for u in &r.users {
        let uid = match u.uid {
            Some(id) => {
                if let Some(other) = used_uids.get(&id) {
                    return Err(RootfsError::UidClash {
                        user: u.name.clone(),
                        uid: id,
                        other: other.clone(),
                    });
                }
                id
            }
            None => next_free(&used_uids).unwrap_or(60000),
        };
        used_uids.insert(uid, u.name.clone());
        let group_name = u.group.clone().unwrap_or_else(|| u.name.clone());
        let gid = match groups.iter().find(|g| g.name == group_name) {
            Some(g) => g.gid,
            None => {
                let gid = if used_gids.contains_key(&uid) {
                    next_free(&used_gids).unwrap_or(60000)
                } else {
                    uid
                };
                used_gids.insert(gid, group_name.clone());
                groups.push(Account {
                    name: group_name.clone(),
                    uid: gid,
                    gid,
                    home: String::new(),
                    shell: String::new(),
                    members: Vec::new(),
                    password: String::new(),
                });
                gid
            }
        };
        for extra in &u.groups {
            match groups.iter_mut().find(|g| &g.name == extra) {
                Some(g) => g.members.push(u.name.clone()),
                None => {
                    return Err(RootfsError::UnknownGroup {
                        user: u.name.clone(),
                        group: extra.clone(),
                    });
                }
            }
        }
        users.push(Account {
            name: u.name.clone(),
            uid,
            gid,
            home: u
                .home
                .clone()
                .unwrap_or_else(|| format!("/home/{}", u.name)),
            shell: u.shell.clone().unwrap_or_else(|| default_shell.into()),
            members: Vec::new(),
            password: u.password_hash.clone().unwrap_or_else(|| "!".into()),
        });
    }
    Ok((users, groups))
}

/// `user:group` (names or numbers) → ids.
fn owner(
    spec: Option<&str>,
    path: &str,
    users: &[Account],
    groups: &[Account],
) -> Result<(u32, u32), RootfsError> {
    let Some(spec) = spec else { return Ok((0, 0)) };
    let (u, g) = spec.split_once(':').unwrap_or((spec, spec));
    let unknown = |what| RootfsError::UnknownOwner {
        path: path.to_string(),
        owner: spec.to_string(),
        what,
    };
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) if u == "root" => 0,
        Err(_) => users
            .iter()
            .find(|a| a.name == u)
            .map(|a| a.uid)
            .ok_or_else(|| unknown("user"))?,
    };
    let gid = match g.parse::<u32>() {
        Ok(n) => n,
        Err(_) if g == "root" => 0,
        Err(_) => groups
            .iter()
            .find(|a| a.name == g)
            .map(|a| a.gid)
            .ok_or_else(|| unknown("group"))?,
    };
    Ok((uid, gid))
}

/// Quote a string for POSIX sh (single quotes).
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
