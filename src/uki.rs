//! Unified kernel images (UAPI.5, "Unified Kernel Image"): systemd-stub with the kernel,
//! initrd, command line, os-release and kernel release as PE sections, in the order the
//! specification lists them, so that one signed EFI binary boots the whole system. Pure: the
//! caller reads the stub from the `systemd-boot-efi` package and writes the result.

use crate::pe::{PeError, add_sections};

/// Where the `systemd-boot-efi` package puts the x86-64 stub.
pub const STUB_PATH: &str = "usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// Where systemd-boot looks for Type #2 entries (unified kernel images) on the ESP.
pub const ESP_DIR: &str = "EFI/Linux";

/// What goes into a UKI.
pub struct UkiParts<'a> {
    pub kernel: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line (the stub passes it on; under Secure Boot it is the only one).
    pub cmdline: &'a str,
    /// An os-release file: systemd-boot takes the menu title and version from it.
    pub os_release: &'a str,
    /// The kernel release (`uname -r`).
    pub uname: Option<&'a str>,
}

/// The UKI: `stub` plus `.osrel`, `.cmdline`, `.uname`, `.initrd` and `.linux` (the kernel
/// last, as the specification orders them).
pub fn assemble(stub: &[u8], parts: &UkiParts<'_>) -> Result<Vec<u8>, PeError> {
    let mut sections: Vec<(&str, &[u8])> = vec![
        (".osrel", parts.os_release.as_bytes()),
        (".cmdline", parts.cmdline.as_bytes()),
    ];
    if let Some(uname) = parts.uname {
        sections.push((".uname", uname.as_bytes()));
    }
    if let Some(initrd) = parts.initrd {
        sections.push((".initrd", initrd));
    }
    sections.push((".linux", parts.kernel));
    add_sections(stub, &sections, "systemd-stub (linuxx64.efi.stub)")
}

/// An os-release for an image that has none of its own (busybox images): the recipe's name,
/// description and version. Values are quoted as os-release(5) says.
pub fn os_release(name: &str, description: Option<&str>, version: Option<&str>) -> String {
    let quote = |v: &str| {
        let escaped: String = v
            .chars()
            .filter(|c| *c != '\n' && *c != '\r')
            .flat_map(|c| match c {
                '"' | '\\' | '`' | '$' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        format!("\"{escaped}\"")
    };
    let id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let pretty = match version {
        Some(v) => format!("{} {v}", description.unwrap_or(name)),
        None => description.unwrap_or(name).to_string(),
    };
    let mut out = format!(
        "NAME={}\nID={id}\nPRETTY_NAME={}\n",
        quote(name),
        quote(&pretty)
    );
    if let Some(v) = version {
        out.push_str(&format!("VERSION_ID={}\n", quote(v)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pe::Pe;

    #[test]
    fn sections_in_the_specified_order() {
        let stub = crate::pe::tests::tiny_pe(0x400);
        let uki = assemble(
            &stub,
            &UkiParts {
                kernel: b"MZkernel",
                initrd: Some(b"070701"),
                cmdline: "console=ttyS0 root=PARTUUID=x",
                os_release: &os_release("app", Some("The \"app\""), Some("1.0")),
                uname: Some("6.1.0-1-amd64"),
            },
        )
        .unwrap();
        let pe = Pe::parse(&uki, "uki").unwrap();
        let names: Vec<&str> = pe.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [".text", ".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
        );
        assert_eq!(
            pe.section(&uki, ".cmdline").unwrap(),
            b"console=ttyS0 root=PARTUUID=x"
        );
        let osrel = String::from_utf8(pe.section(&uki, ".osrel").unwrap().to_vec()).unwrap();
        assert!(
            osrel.contains("PRETTY_NAME=\"The \\\"app\\\" 1.0\""),
            "{osrel}"
        );
        assert!(osrel.contains("ID=app\n"), "{osrel}");
    }
}
