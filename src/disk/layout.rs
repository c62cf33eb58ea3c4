//! Disk layout (interim: size parsing only; the planner lands with the GPT work).

/// A size as written in a recipe or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Bytes(u64),
    Auto,
    Rest,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("invalid size `{0}`")]
    BadSize(String),
}

/// Parse `512M`, `2G`, `2GiB`, `4096`, `auto`, `rest` (binary units).
pub fn parse_size(text: &str) -> Result<Size, LayoutError> {
    let t = text.trim();
    match t {
        "auto" => return Ok(Size::Auto),
        "rest" => return Ok(Size::Rest),
        _ => {}
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| LayoutError::BadSize(text.into()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return Err(LayoutError::BadSize(text.into())),
    };
    n.checked_mul(mult)
        .map(Size::Bytes)
        .ok_or_else(|| LayoutError::BadSize(text.into()))
}
