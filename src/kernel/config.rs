//! Kernel configuration text (`.config` and fragments) as data: parsing, merging a fragment onto
//! a base configuration the way the kernel's `scripts/kconfig/merge_config.sh` does, and finding
//! the options a fragment asked for that `make olddefconfig` did not keep. No I/O here; the build
//! driver in [`super::build`] reads and writes the files.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

/// The value of one option. `# CONFIG_X is not set` and `CONFIG_X=n` are both [`Value::No`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Yes,
    Module,
    No,
    /// A string (kept with its quotes, as written), number or hex value.
    Other(String),
}

impl Value {
    fn parse(text: &str) -> Value {
        match text {
            "y" => Value::Yes,
            "m" => Value::Module,
            "n" => Value::No,
            other => Value::Other(other.to_string()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Yes => f.write_str("y"),
            Value::Module => f.write_str("m"),
            Value::No => f.write_str("is not set"),
            Value::Other(v) => f.write_str(v),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "{source_name}:{line}: `{text}` is not a kernel option (expected `CONFIG_NAME=value` or \
         `# CONFIG_NAME is not set`)"
    )]
    Syntax {
        source_name: String,
        line: usize,
        text: String,
    },
    #[error(
        "{source_name}:{line}: CONFIG_{name} is set again (first on line {first}); keep one line \
         per option"
    )]
    Duplicate {
        source_name: String,
        name: String,
        line: usize,
        first: usize,
    },
}

/// A parsed configuration or fragment: options in the order they appear, names without the
/// `CONFIG_` prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    options: Vec<(String, Value)>,
    index: BTreeMap<String, usize>,
}

impl Config {
    /// Parse `.config` text. `source_name` names the text in errors (a file name). Comments
    /// other than `# CONFIG_X is not set` and blank lines are ignored; an option set twice is an
    /// error (a fragment that says two things is a mistake to fix, not to guess about).
    pub fn parse(source_name: &str, text: &str) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let mut lines: BTreeMap<String, usize> = BTreeMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let parsed = if let Some(rest) = line.strip_prefix('#') {
                match rest
                    .trim()
                    .strip_prefix("CONFIG_")
                    .and_then(|r| r.strip_suffix(" is not set"))
                {
                    Some(name) if is_name(name) => Some((name.to_string(), Value::No)),
                    _ => continue,
                }
            } else if line.is_empty() {
                continue;
            } else {
                line.strip_prefix("CONFIG_")
                    .and_then(|r| r.split_once('='))
                    .filter(|(name, value)| is_name(name) && !value.is_empty())
                    .map(|(name, value)| (name.to_string(), Value::parse(value)))
            };
            let Some((name, value)) = parsed else {
                return Err(ConfigError::Syntax {
                    source_name: source_name.to_string(),
                    line: n + 1,
                    text: line.to_string(),
                });
            };
            if let Some(first) = lines.get(&name) {
                return Err(ConfigError::Duplicate {
                    source_name: source_name.to_string(),
                    name,
                    line: n + 1,
                    first: *first,
                });
            }
            lines.insert(name.clone(), n + 1);
            config.set(&name, value);
        }
        Ok(config)
    }

    /// The value of `name` (without `CONFIG_`); `None` when the text does not mention it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.index.get(name).map(|&i| &self.options[i].1)
    }

    /// Set `name`, keeping its place when it is already there, else appending it.
    pub fn set(&mut self, name: &str, value: Value) {
        match self.index.get(name) {
            Some(&i) => self.options[i].1 = value,
            None => {
                self.index.insert(name.to_string(), self.options.len());
                self.options.push((name.to_string(), value));
            }
        }
    }

    pub fn options(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.options.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.options.len()
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }

    /// Whether any option is `=m` (the kernel then has modules to build).
    pub fn has_modules(&self) -> bool {
        self.get("MODULES") == Some(&Value::Yes)
            && self.options.iter().any(|(_, v)| *v == Value::Module)
    }

    /// Whether every option in `names` is built in (`=y`).
    pub fn all_builtin(&self, names: &[&str]) -> bool {
        names.iter().all(|n| self.get(n) == Some(&Value::Yes))
    }

    /// `.config` text: one line per option in order, `# CONFIG_X is not set` for [`Value::No`].
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.options {
            match value {
                Value::No => out.push_str(&format!("# CONFIG_{name} is not set\n")),
                v => out.push_str(&format!("CONFIG_{name}={v}\n")),
            }
        }
        out
    }
}

/// Kconfig symbols: letters (a few have lower case, e.g. `FONT_8x16`), digits, `_`.
fn is_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What merging a fragment changed in the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub name: String,
    pub base: Value,
    pub fragment: Value,
}

/// Merge `fragment` onto `base` as `merge_config.sh` does: every option of the fragment replaces
/// the base's value (in the base's place) or is appended. Returns the merged configuration and
/// the options whose value the fragment changed.
pub fn merge(base: &Config, fragment: &Config) -> (Config, Vec<Override>) {
    let mut merged = base.clone();
    let mut overrides = Vec::new();
    for (name, value) in fragment.options() {
        if let Some(old) = base.get(name)
            && old != value
        {
            overrides.push(Override {
                name: name.to_string(),
                base: old.clone(),
                fragment: value.clone(),
            });
        }
        merged.set(name, value.clone());
    }
    (merged, overrides)
}

/// An option the fragment asked for that the final configuration does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub name: String,
    pub requested: Value,
    /// `None`: the option is not in the final configuration at all (it does not exist in this
    /// kernel, or its menu is hidden by a dependency).
    pub actual: Option<Value>,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let actual = match &self.actual {
            None => "absent (unknown option, or a dependency is off)".to_string(),
            Some(v) => v.to_string(),
        };
        write!(
            f,
            "CONFIG_{} (asked {}, got {actual})",
            self.name, self.requested
        )
    }
}

/// The options of `fragment` whose value `final_config` (after `make olddefconfig`) does not
/// have, like `merge_config.sh`'s closing check. Asking for "not set" is satisfied by an absent
/// option.
pub fn dropped(fragment: &Config, final_config: &Config) -> Vec<Dropped> {
    fragment
        .options()
        .filter_map(|(name, requested)| {
            let actual = final_config.get(name);
            let kept = match (requested, actual) {
                (Value::No, None) => true,
                (r, Some(a)) => r == a,
                (_, None) => false,
            };
            (!kept).then(|| Dropped {
                name: name.to_string(),
                requested: requested.clone(),
                actual: actual.cloned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_CC_VERSION_TEXT=\"gcc (Debian 12.2.0-14) 12.2.0\"
CONFIG_64BIT=y
# CONFIG_MODULES is not set
CONFIG_LOG_BUF_SHIFT=17
# CONFIG_EXT4_FS is not set
CONFIG_PRINTK=y
";

    #[test]
    fn parses_values_and_not_set_comments() {
        let c = Config::parse("base", BASE).unwrap();
        assert_eq!(c.len(), 6);
        assert_eq!(c.get("64BIT"), Some(&Value::Yes));
        assert_eq!(c.get("MODULES"), Some(&Value::No));
        assert_eq!(c.get("LOG_BUF_SHIFT"), Some(&Value::Other("17".into())));
        assert_eq!(
            c.get("CC_VERSION_TEXT"),
            Some(&Value::Other("\"gcc (Debian 12.2.0-14) 12.2.0\"".into()))
        );
        assert_eq!(c.get("NOPE"), None);
        let fonts = Config::parse("c", "CONFIG_FONT_8x16=y\n").unwrap();
        assert_eq!(fonts.get("FONT_8x16"), Some(&Value::Yes));
        // Rendering gives the same options back.
        assert_eq!(Config::parse("again", &c.render()).unwrap(), c);
    }

    #[test]
    fn syntax_errors_and_duplicates_name_the_line() {
        let cases: &[(&str, ConfigError)] = &[
            (
                "CONFIG_A=y\nEXT4=y\n",
                ConfigError::Syntax {
                    source_name: "f.config".into(),
                    line: 2,
                    text: "EXT4=y".into(),
                },
            ),
            (
                "CONFIG_A-B=y\n",
                ConfigError::Syntax {
                    source_name: "f.config".into(),
                    line: 1,
                    text: "CONFIG_A-B=y".into(),
                },
            ),
            (
                "CONFIG_A=\n",
                ConfigError::Syntax {
                    source_name: "f.config".into(),
                    line: 1,
                    text: "CONFIG_A=".into(),
                },
            ),
            (
                "CONFIG_A=y\n\n# CONFIG_A is not set\n",
                ConfigError::Duplicate {
                    source_name: "f.config".into(),
                    name: "A".into(),
                    line: 3,
                    first: 1,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                &Config::parse("f.config", text).unwrap_err(),
                want,
                "{text}"
            );
        }
        let e = Config::parse("f.config", "EXT4=y").unwrap_err().to_string();
        assert!(
            e.starts_with("f.config:1: `EXT4=y` is not a kernel option"),
            "{e}"
        );
    }

    #[test]
    fn merge_overrides_in_place_and_appends_new_options() {
        let base = Config::parse("base", BASE).unwrap();
        let frag = Config::parse(
            "frag",
            "CONFIG_EXT4_FS=y\nCONFIG_PRINTK=y\nCONFIG_VIRTIO_BLK=y\n# CONFIG_64BIT is not set\n",
        )
        .unwrap();
        let (merged, overrides) = merge(&base, &frag);
        let names: Vec<&str> = merged.options().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "CC_VERSION_TEXT",
                "64BIT",
                "MODULES",
                "LOG_BUF_SHIFT",
                "EXT4_FS",
                "PRINTK",
                "VIRTIO_BLK"
            ]
        );
        assert_eq!(merged.get("EXT4_FS"), Some(&Value::Yes));
        assert_eq!(merged.get("64BIT"), Some(&Value::No));
        // PRINTK was already y: not an override.
        assert_eq!(
            overrides,
            vec![
                Override {
                    name: "EXT4_FS".into(),
                    base: Value::No,
                    fragment: Value::Yes
                },
                Override {
                    name: "64BIT".into(),
                    base: Value::Yes,
                    fragment: Value::No
                },
            ]
        );
        assert!(merged.render().contains("# CONFIG_64BIT is not set\n"));
    }

    #[test]
    fn finds_options_that_did_not_survive() {
        let frag = Config::parse(
            "frag",
            "CONFIG_EXT4_FS=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_NO_SUCH=y\n# CONFIG_GONE is not set\n\
             CONFIG_LOG_BUF_SHIFT=18\nCONFIG_E1000=m\n",
        )
        .unwrap();
        let fin = Config::parse(
            "final",
            "CONFIG_EXT4_FS=y\n# CONFIG_VIRTIO_BLK is not set\nCONFIG_LOG_BUF_SHIFT=17\n\
             CONFIG_E1000=y\n",
        )
        .unwrap();
        let d = dropped(&frag, &fin);
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["VIRTIO_BLK", "NO_SUCH", "LOG_BUF_SHIFT", "E1000"]);
        assert_eq!(
            d[0].to_string(),
            "CONFIG_VIRTIO_BLK (asked y, got is not set)"
        );
        assert_eq!(
            d[1].to_string(),
            "CONFIG_NO_SUCH (asked y, got absent (unknown option, or a dependency is off))"
        );
        assert_eq!(d[3].to_string(), "CONFIG_E1000 (asked m, got y)");
        assert!(dropped(&frag, &frag).is_empty());
    }

    #[test]
    fn modules_and_builtin_checks() {
        let c = Config::parse("c", "CONFIG_MODULES=y\nCONFIG_A=m\nCONFIG_B=y\n").unwrap();
        assert!(c.has_modules());
        assert!(c.all_builtin(&["B"]));
        assert!(!c.all_builtin(&["A", "B"]));
        assert!(!c.all_builtin(&["C"]));
        let c = Config::parse("c", "# CONFIG_MODULES is not set\nCONFIG_A=m\n").unwrap();
        assert!(!c.has_modules());
    }
}
