//! Bounds on what loading an untrusted recipe may cost: the size of the files read, the work
//! and time one template render may take, and the output renders may produce. The defaults are
//! the constants below; operators change them through [`Limits`] in `LoadOptions`, never a
//! recipe. Pure data; the renderer and the loader enforce them.

use std::time::Duration;

/// minijinja fuel per render. One fuel pays for one template instruction or for 64 bytes of data
/// a template creates (output, strings and lists built by operators, filters and functions), so
/// the budget bounds both the time and the memory of a render: 2 million fuel is about 2 million
/// instructions or 128 MiB of data, about 4 s of the costliest work in a debug build. The
/// example recipes use under 100 per render.
pub const DEFAULT_FUEL: u64 = 2_000_000;

/// Output of one render (a recipe file, or a template file entry): 16 MiB.
pub const DEFAULT_MAX_FILE_OUTPUT: u64 = 16 << 20;

/// Output of all the renders of one recipe load together: 64 MiB.
pub const DEFAULT_MAX_TOTAL_OUTPUT: u64 = 64 << 20;

/// Wall-clock time of one render, includes and imports included: 10 s. In-process it is checked
/// whenever the render writes output or loads a template (fuel bounds the work between); a render
/// child is killed when it runs 1 s past it.
pub const DEFAULT_RENDER_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of one recipe file, template file or kernel configuration fragment read: 4 MiB.
pub const DEFAULT_MAX_SOURCE_BYTES: u64 = 4 << 20;

/// Address space of a render child process (see `recipe::sandbox`): 1 GiB. Catches what fuel
/// does not charge (exponentially large displays of lists that share items); the kiln binary's
/// own mappings take about 100 MiB of it.
pub const DEFAULT_MAX_MEMORY: u64 = 1 << 30;

/// minijinja's recursion limit (nested includes, macro calls, blocks and loops; an include or a
/// macro call counts several levels): 500, minijinja's default and its maximum. Measured: 500
/// levels fit the 2 MiB stack of a worker thread in a debug build.
pub const DEFAULT_RECURSION_LIMIT: usize = 500;

/// The bounds a recipe load runs under. [`Limits::default`] gives the `DEFAULT_*` constants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// minijinja fuel per render ([`DEFAULT_FUEL`]).
    pub fuel: u64,
    /// Bytes one render may produce ([`DEFAULT_MAX_FILE_OUTPUT`]).
    pub max_file_output: u64,
    /// Bytes all renders of one load may produce ([`DEFAULT_MAX_TOTAL_OUTPUT`]).
    pub max_total_output: u64,
    /// Wall-clock time of one render ([`DEFAULT_RENDER_TIMEOUT`]).
    pub render_timeout: Duration,
    /// Bytes of one recipe, template or fragment file ([`DEFAULT_MAX_SOURCE_BYTES`]).
    pub max_source_bytes: u64,
    /// Nesting depth of includes, macros and blocks ([`DEFAULT_RECURSION_LIMIT`]; at most 500).
    pub recursion_limit: usize,
    /// Address space of a render child, bytes ([`DEFAULT_MAX_MEMORY`]).
    pub max_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: DEFAULT_FUEL,
            max_file_output: DEFAULT_MAX_FILE_OUTPUT,
            max_total_output: DEFAULT_MAX_TOTAL_OUTPUT,
            render_timeout: DEFAULT_RENDER_TIMEOUT,
            max_source_bytes: DEFAULT_MAX_SOURCE_BYTES,
            recursion_limit: DEFAULT_RECURSION_LIMIT,
            max_memory: DEFAULT_MAX_MEMORY,
        }
    }
}

/// Which bound a render crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Fuel,
    FileOutput,
    TotalOutput,
    Time,
    Recursion,
    Memory,
}

impl Limit {
    /// "… passed the limit of …" for a diagnostic, with the limit's value.
    pub fn describe(self, limits: &Limits) -> String {
        match self {
            Limit::Fuel => format!(
                "template rendering ran out of fuel: it did more work than the limit of {} fuel \
                 (one fuel is one template instruction or 64 bytes of data)",
                limits.fuel
            ),
            Limit::FileOutput => format!(
                "the render produced more than the limit of {} per rendered file",
                bytes(limits.max_file_output)
            ),
            Limit::TotalOutput => format!(
                "the recipe's renders produced more than the limit of {} in total",
                bytes(limits.max_total_output)
            ),
            Limit::Time => format!(
                "the render took longer than the limit of {} s",
                limits.render_timeout.as_secs_f64()
            ),
            Limit::Recursion => format!(
                "templates nest deeper than the limit of {} levels (includes, macros, blocks)",
                limits.recursion_limit
            ),
            Limit::Memory => format!(
                "the render needed more memory than the limit of {} (huge strings or lists, or \
                 lists that share their items, displayed, serialized or compared)",
                bytes(limits.max_memory)
            ),
        }
    }

    /// What to do about it.
    pub fn help(self) -> &'static str {
        match self {
            Limit::Fuel => {
                "make the template do less work (smaller loops, no huge strings or lists); the \
                 operator sets the limit (--render-fuel on kiln up/worker/build/render), recipes cannot"
            }
            Limit::FileOutput => {
                "make the template produce less text, or split it into several files; the \
                 operator sets the limit (--render-output MIB)"
            }
            Limit::TotalOutput => {
                "make the templates produce less text; the operator sets the limit \
                 (--render-total-output MIB)"
            }
            Limit::Time => {
                "make the template do less work; the operator sets the limit \
                 (--render-timeout SECS)"
            }
            Limit::Recursion => {
                "check for a template that includes itself or a macro that calls itself without \
                 end; the operator sets the limit (recipe::Limits::recursion_limit; 500 at most)"
            }
            Limit::Memory => {
                "make the template build smaller values; the operator sets the limit \
                 (--render-memory MIB)"
            }
        }
    }
}

/// `16 MiB`, `4 KiB` or `123 bytes`.
pub fn bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// Why [`read_bounded`] gave no text.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "the file is larger than the limit of {} for recipes, templates and fragments \
         (--recipe-max-size MIB, an operator setting)",
        bytes(*.limit)
    )]
    TooLarge { limit: u64 },
}

/// Read a text file of at most `max` bytes; never reads more than `max + 1`.
pub fn read_bounded(path: &std::path::Path, max: u64) -> Result<String, ReadError> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(max.saturating_add(1)).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(ReadError::TooLarge { limit: max });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_as_units() {
        assert_eq!(bytes(16 << 20), "16 MiB");
        assert_eq!(bytes(4096), "4 KiB");
        assert_eq!(bytes(1000), "1000 bytes");
    }

    #[test]
    fn bounded_reads_refuse_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "12345").unwrap();
        assert_eq!(read_bounded(&path, 5).unwrap(), "12345");
        let err = read_bounded(&path, 4).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { limit: 4 }), "{err}");
        assert!(err.to_string().contains("limit of 4 bytes"), "{err}");
    }
}
