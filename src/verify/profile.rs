//! Machine profiles: the TOML files in the project's `qemu/` directory (`direct.toml`,
//! `uefi.toml`) that say how QEMU builds the test machine. The files document every field; this
//! module parses and checks them and finds the directory they live in.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::VerifyError;

/// The environment variable naming the profile directory.
pub const PROFILES_ENV: &str = "KILN_QEMU_PROFILES";

/// Copies of the project's profiles, used when no profile directory exists (an installed binary
/// run away from the source tree).
const BUILTIN: &[(&str, &str)] = &[
    ("direct", include_str!("../../qemu/direct.toml")),
    ("uefi", include_str!("../../qemu/uefi.toml")),
    (
        "uefi-secureboot",
        include_str!("../../qemu/uefi-secureboot.toml"),
    ),
];

/// How the machine boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMethod {
    /// QEMU loads kernel, initrd and command line itself (`-kernel/-initrd/-append`).
    Direct,
    /// OVMF firmware boots the disk's ESP.
    Uefi,
}

/// Which accelerator a profile asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when the probe shows it runs guests, else TCG.
    #[default]
    Auto,
    /// KVM, and an error when the probe says it cannot run guests.
    Kvm,
    /// TCG (software emulation); no probe.
    Tcg,
}

/// UEFI firmware files (the `ovmf` package).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    /// Firmware code, attached read-only.
    pub code: PathBuf,
    /// Variable store template; each boot gets a private copy.
    pub vars: PathBuf,
}

/// The profile a build boots with when neither the request nor the recipe names one.
pub const DEFAULT_PROFILE: &str = "direct";

/// A machine profile. See `qemu/direct.toml` for what each field means.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile's name: its file name without `.toml`.
    #[serde(skip)]
    pub name: String,
    /// Where it was read from (`builtin:<name>` for the built-in copies).
    #[serde(skip)]
    pub source: String,
    #[serde(default)]
    pub description: String,
    pub boot: BootMethod,
    pub machine: String,
    pub memory_mib: u32,
    pub cpus: u32,
    #[serde(default)]
    pub accel: AccelChoice,
    /// Appended to the caller's kernel command line (direct boot only).
    #[serde(default)]
    pub append: String,
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Let the guest reboot instead of ending the boot there (`uefi-secureboot`: systemd-boot
    /// enrolls the Secure Boot keys, then resets the machine).
    #[serde(default)]
    pub reboot: bool,
    /// Required for `boot = "uefi"`, refused for `boot = "direct"`.
    #[serde(default)]
    pub firmware: Option<Firmware>,
}

impl Profile {
    /// Parse and check a profile's text. `name` is the profile name, `source` where the text came
    /// from (for messages).
    pub fn parse(name: &str, source: &str, text: &str) -> Result<Profile, VerifyError> {
        let mut profile: Profile = toml::from_str(text).map_err(|e| VerifyError::ProfileParse {
            source_name: source.to_string(),
            message: e.to_string(),
        })?;
        profile.name = name.to_string();
        profile.source = source.to_string();
        profile.check()?;
        Ok(profile)
    }

    /// Read a profile file; its name is the file stem.
    pub fn load(path: &Path) -> Result<Profile, VerifyError> {
        let text = std::fs::read_to_string(path).map_err(|source| VerifyError::Io {
            what: "reading the machine profile",
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Profile::parse(&name, &path.display().to_string(), &text)
    }

    /// One of the built-in copies of the project's profiles (`direct`, `uefi`).
    pub fn builtin(name: &str) -> Option<Profile> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        Profile::parse(name, &format!("builtin:{name}"), text).ok()
    }

    fn check(&self) -> Result<(), VerifyError> {
        let invalid = |reason: String| VerifyError::ProfileInvalid {
            source_name: self.source.clone(),
            reason,
        };
        if self.machine.is_empty() || self.machine.contains(char::is_whitespace) {
            return Err(invalid(format!(
                "machine {:?} must be a QEMU machine type such as \"q35\" or \"pc\"",
                self.machine
            )));
        }
        if !(64..=1 << 20).contains(&self.memory_mib) {
            return Err(invalid(format!(
                "memory_mib = {} is outside 64..=1048576",
                self.memory_mib
            )));
        }
        if !(1..=256).contains(&self.cpus) {
            return Err(invalid(format!("cpus = {} is outside 1..=256", self.cpus)));
        }
        if self.append.contains(['\n', '\0']) {
            return Err(invalid("append must be one line".into()));
        }
        match (self.boot, &self.firmware) {
            (BootMethod::Uefi, None) => Err(invalid(
                "boot = \"uefi\" needs a [firmware] table with code and vars (the OVMF files)"
                    .into(),
            )),
            (BootMethod::Direct, Some(_)) => Err(invalid(
                "boot = \"direct\" runs no firmware; remove the [firmware] table".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Longest profile name.
pub const NAME_MAX: usize = 64;

/// A profile named by a build request or a recipe is a name looked up in the worker's own
/// profile directory: 1 to [`NAME_MAX`] characters of `[A-Za-z0-9_-]`, starting with a letter
/// or digit. Never a path: QEMU arguments come only from files the operator put there.
pub fn check_name(name: &str) -> Result<(), VerifyError> {
    let ok = name.len() <= NAME_MAX
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(VerifyError::ProfileName {
            name: name.chars().take(NAME_MAX).collect(),
        })
    }
}

/// Where profiles are looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileDir {
    /// A directory on the host.
    Dir(PathBuf),
    /// No directory: the copies built into kiln.
    Builtin,
}

impl ProfileDir {
    /// The profile directory: `explicit` (a `--profiles DIR` option), else `$KILN_QEMU_PROFILES`,
    /// else the project's `qemu/` directory (the crate directory kiln was built from) when it
    /// exists, else the built-in copies. A directory that was asked for must exist.
    pub fn locate(explicit: Option<&Path>) -> Result<ProfileDir, VerifyError> {
        let asked = explicit.map(Path::to_path_buf).or_else(|| {
            std::env::var_os(PROFILES_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        if let Some(dir) = asked {
            if !dir.is_dir() {
                return Err(VerifyError::ProfileDirMissing { dir });
            }
            return Ok(ProfileDir::Dir(dir));
        }
        let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu");
        if project.is_dir() {
            Ok(ProfileDir::Dir(project))
        } else {
            Ok(ProfileDir::Builtin)
        }
    }

    /// Load profile `name` (a file `<name>.toml` in the directory). Only names are accepted
    /// ([`check_name`]); `kiln boot` turns a path given on its command line into a directory
    /// and a name itself ([`ProfileDir::split_path`]).
    pub fn load(&self, name: &str) -> Result<Profile, VerifyError> {
        check_name(name)?;
        match self {
            ProfileDir::Dir(dir) => {
                let path = dir.join(format!("{name}.toml"));
                if !path.is_file() {
                    return Err(VerifyError::ProfileNotFound {
                        name: name.to_string(),
                        dir: dir.display().to_string(),
                        available: self.names().join(", "),
                    });
                }
                Profile::load(&path)
            }
            ProfileDir::Builtin => match BUILTIN.iter().find(|(n, _)| *n == name) {
                Some((_, text)) => Profile::parse(name, &format!("builtin:{name}"), text),
                None => Err(VerifyError::ProfileNotFound {
                    name: name.to_string(),
                    dir: "the built-in profiles".into(),
                    available: self.names().join(", "),
                }),
            },
        }
    }

    /// A profile argument given by the operator on the command line: a path to a profile file
    /// (it contains `/` or ends in `.toml`) becomes `(its directory, its name)`; a name is
    /// returned as it is, with no directory.
    pub fn split_path(arg: &str) -> (Option<PathBuf>, String) {
        if !arg.contains('/') && !arg.ends_with(".toml") {
            return (None, arg.to_string());
        }
        let path = Path::new(arg);
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        (Some(dir), name)
    }

    /// Names of the profiles available, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            ProfileDir::Builtin => BUILTIN.iter().map(|(n, _)| n.to_string()).collect(),
            ProfileDir::Dir(dir) => std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".toml").map(str::to_string)
                })
                .collect(),
        };
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_profiles_parse() {
        for (name, text) in BUILTIN {
            let p = Profile::parse(name, name, text).unwrap();
            assert!(p.machine.starts_with("q35"), "{name}: {}", p.machine);
            assert_eq!(p.boot == BootMethod::Uefi, p.firmware.is_some());
        }
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let base = "boot = \"direct\"\nmachine = \"q35\"\nmemory_mib = 512\ncpus = 1\n";
        assert!(Profile::parse("x", "x", base).is_ok());
        let unknown = format!("{base}memory = 3\n");
        let e = Profile::parse("x", "x", &unknown).unwrap_err().to_string();
        assert!(e.contains("memory"), "{e}");
        let uefi = base.replace("direct", "uefi");
        let e = Profile::parse("x", "x", &uefi).unwrap_err().to_string();
        assert!(e.contains("[firmware]"), "{e}");
        let small = base.replace("512", "8");
        assert!(Profile::parse("x", "x", &small).is_err());
        let method = base.replace("direct", "bios");
        assert!(Profile::parse("x", "x", &method).is_err());
    }

    #[test]
    fn requests_name_profiles_and_never_reach_files() {
        for good in ["direct", "uefi", "uefi-secureboot", "a_1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(NAME_MAX + 1);
        for bad in [
            "",
            "../etc/x",
            "/tmp/evil.toml",
            "evil.toml",
            "a/b",
            "..",
            ".hidden",
            "-x",
            "a b",
            "a\nb",
            long.as_str(),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
            let dir = ProfileDir::Dir(PathBuf::from("/nonexistent"));
            let e = dir.load(bad).unwrap_err().to_string();
            assert!(e.contains("profile name"), "{e}");
        }
        assert_eq!(
            ProfileDir::split_path("/srv/kiln/qemu/fast.toml"),
            (Some(PathBuf::from("/srv/kiln/qemu")), "fast".to_string())
        );
        assert_eq!(
            ProfileDir::split_path("fast.toml"),
            (Some(PathBuf::from(".")), "fast".to_string())
        );
        assert_eq!(ProfileDir::split_path("uefi"), (None, "uefi".to_string()));
    }
}
