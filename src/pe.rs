//! PE/COFF images (UEFI executables) as bytes: reading the headers and sections kiln needs
//! ([`Pe::parse`]), appending sections to an image whose headers have room for them
//! ([`add_sections`], how a unified kernel image is made from systemd-stub), the optional
//! header's checksum ([`checksum`]) and the Authenticode digest that Secure Boot signs
//! ([`authenticode_sha256`]). Pure: no I/O; every offset read is checked against the buffer.

use sha2::{Digest, Sha256};

/// PE32+ (64-bit) optional header magic.
const PE32_PLUS: u16 = 0x20b;
/// Bytes of one section header.
const SECTION_HEADER: usize = 40;
/// `IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ`: what a UKI's data sections are.
pub const DATA_READ_ONLY: u32 = 0x4000_0040;
/// Index of the certificate table (the "security directory") among the data directories.
const CERTIFICATE_TABLE: usize = 4;

/// Why bytes are not a PE image kiln can work with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeError {
    #[error("{what}: not a PE image ({reason})")]
    Malformed { what: String, reason: String },
    #[error(
        "{what}: its headers have room for {room} more section header(s), {needed} are needed \
         (a systemd-stub from a systemd-boot-efi package has room for seven)"
    )]
    NoRoom {
        what: String,
        room: usize,
        needed: usize,
    },
    #[error("{what}: section name {name:?} is longer than 8 bytes")]
    LongName { what: String, name: String },
    #[error("{what}: the image would be larger than 4 GiB, which PE cannot address")]
    TooLarge { what: String },
}

/// One section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub virtual_size: u32,
    pub virtual_address: u32,
    pub raw_size: u32,
    pub raw_offset: u32,
    pub characteristics: u32,
}

/// What kiln reads from a PE32+ image's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pe {
    /// Offset of the COFF header (after `PE\0\0`).
    coff: usize,
    /// Offset of the optional header.
    optional: usize,
    /// Offset of the section table.
    table: usize,
    pub section_alignment: u32,
    pub file_alignment: u32,
    pub size_of_image: u32,
    pub size_of_headers: u32,
    pub sections: Vec<Section>,
    /// The certificate table (file offset, size), when the image is signed.
    pub certificates: Option<(u32, u32)>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn align(v: u64, to: u32) -> u64 {
    let to = u64::from(to.max(1));
    v.div_ceil(to) * to
}

impl Pe {
    /// Offset of the optional header's `CheckSum` field.
    fn checksum_field(&self) -> usize {
        self.optional + 64
    }

    /// Offset of the certificate table's data directory entry.
    fn certificate_entry(&self) -> usize {
        self.optional + 112 + CERTIFICATE_TABLE * 8
    }

    /// Parse the headers of `bytes` (`what` names it in errors).
    pub fn parse(bytes: &[u8], what: &str) -> Result<Pe, PeError> {
        let bad = |reason: &str| PeError::Malformed {
            what: what.to_string(),
            reason: reason.to_string(),
        };
        if bytes.get(..2) != Some(b"MZ") {
            return Err(bad("no MZ header"));
        }
        let pe = u32_at(bytes, 0x3c).ok_or_else(|| bad("truncated DOS header"))? as usize;
        if bytes.get(pe..pe + 4) != Some(b"PE\0\0") {
            return Err(bad("no PE signature where the DOS header points"));
        }
        let coff = pe + 4;
        let sections = u16_at(bytes, coff + 2).ok_or_else(|| bad("truncated COFF header"))?;
        let optional_size =
            u16_at(bytes, coff + 16).ok_or_else(|| bad("truncated COFF header"))? as usize;
        let optional = coff + 20;
        if u16_at(bytes, optional) != Some(PE32_PLUS) {
            return Err(bad("not PE32+ (a 64-bit UEFI image)"));
        }
        let field = |off: usize| {
            u32_at(bytes, optional + off).ok_or_else(|| bad("truncated optional header"))
        };
        let directories = field(108)? as usize;
        if optional_size < 112 + directories * 8 || directories <= CERTIFICATE_TABLE {
            return Err(bad("the optional header has no certificate table entry"));
        }
        let table = optional + optional_size;
        let mut list = Vec::new();
        for i in 0..usize::from(sections) {
            let at = table + i * SECTION_HEADER;
            let h = bytes
                .get(at..at + SECTION_HEADER)
                .ok_or_else(|| bad("truncated section table"))?;
            let name_bytes = &h[..8];
            let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(8);
            let word = |o: usize| u32_at(h, o).unwrap_or(0);
            list.push(Section {
                name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
                virtual_size: word(8),
                virtual_address: word(12),
                raw_size: word(16),
                raw_offset: word(20),
                characteristics: word(36),
            });
        }
        for s in &list {
            if u64::from(s.raw_offset) + u64::from(s.raw_size) > bytes.len() as u64 {
                return Err(bad(&format!(
                    "section {} ends past the end of the file",
                    s.name
                )));
            }
        }
        let cert_entry = optional + 112 + CERTIFICATE_TABLE * 8;
        let cert_offset = u32_at(bytes, cert_entry).ok_or_else(|| bad("truncated directories"))?;
        let cert_size =
            u32_at(bytes, cert_entry + 4).ok_or_else(|| bad("truncated directories"))?;
        Ok(Pe {
            coff,
            optional,
            table,
            section_alignment: field(32)?,
            file_alignment: field(36)?,
            size_of_image: field(56)?,
            size_of_headers: field(60)?,
            sections: list,
            certificates: (cert_size > 0).then_some((cert_offset, cert_size)),
        })
    }

    /// Bytes of `image` before its certificate table (all of it when unsigned).
    fn unsigned_len(&self, image: &[u8]) -> usize {
        match self.certificates {
            Some((offset, _)) if (offset as usize) <= image.len() => offset as usize,
            _ => image.len(),
        }
    }

    /// The raw bytes of the section `name`, cut to its virtual size.
    pub fn section<'a>(&self, bytes: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let s = self.sections.iter().find(|s| s.name == name)?;
        let start = s.raw_offset as usize;
        let len = s.raw_size.min(s.virtual_size) as usize;
        bytes.get(start..start + len)
    }
}

/// `image` with `sections` (name, content) appended after its last section, in that order:
/// each at the next page-aligned virtual address, its raw data aligned to the file alignment,
/// marked initialised read-only data. The headers are updated (section count, image size,
/// initialised data size, checksum); a signature the image had is dropped, since it no longer
/// covers the image.
pub fn add_sections(
    image: &[u8],
    sections: &[(&str, &[u8])],
    what: &str,
) -> Result<Vec<u8>, PeError> {
    let pe = Pe::parse(image, what)?;
    let table_end = pe.table + pe.sections.len() * SECTION_HEADER;
    let room = (pe.size_of_headers as usize).saturating_sub(table_end) / SECTION_HEADER;
    if room < sections.len() {
        return Err(PeError::NoRoom {
            what: what.to_string(),
            room,
            needed: sections.len(),
        });
    }
    // Only the headers and sections: no signature (it would no longer cover the image) and no
    // COFF symbol table (deprecated for images; left behind, it would be a gap that neither the
    // loader nor an Authenticode digest covers as a section).
    let body_len = pe
        .sections
        .iter()
        .map(|s| (s.raw_offset + s.raw_size) as usize)
        .fold(pe.size_of_headers as usize, usize::max)
        .min(image.len());
    let mut out = image[..body_len].to_vec();
    put_u32(&mut out, pe.coff + 8, 0);
    put_u32(&mut out, pe.coff + 12, 0);
    let too_large = || PeError::TooLarge {
        what: what.to_string(),
    };
    // Page-aligned addresses also satisfy any smaller section alignment, and the kernel's.
    let page = pe.section_alignment.max(4096);
    let mut next_va = align(u64::from(pe.size_of_image), page);
    let mut initialized = u64::from(u32_at(image, pe.optional + 8).unwrap_or(0));
    for (i, (name, data)) in sections.iter().enumerate() {
        if name.len() > 8 {
            return Err(PeError::LongName {
                what: what.to_string(),
                name: name.to_string(),
            });
        }
        let raw_offset = align(out.len() as u64, pe.file_alignment);
        let raw_size = align(data.len() as u64, pe.file_alignment);
        out.resize(raw_offset as usize, 0);
        out.extend_from_slice(data);
        out.resize((raw_offset + raw_size) as usize, 0);
        let mut header = [0u8; SECTION_HEADER];
        header[..name.len()].copy_from_slice(name.as_bytes());
        let size = u32::try_from(data.len()).map_err(|_| too_large())?;
        put_u32(&mut header, 8, size);
        put_u32(
            &mut header,
            12,
            u32::try_from(next_va).map_err(|_| too_large())?,
        );
        put_u32(
            &mut header,
            16,
            u32::try_from(raw_size).map_err(|_| too_large())?,
        );
        put_u32(
            &mut header,
            20,
            u32::try_from(raw_offset).map_err(|_| too_large())?,
        );
        put_u32(&mut header, 36, DATA_READ_ONLY);
        let at = table_end + i * SECTION_HEADER;
        out[at..at + SECTION_HEADER].copy_from_slice(&header);
        next_va = align(next_va + u64::from(size), page);
        initialized += raw_size;
    }
    if out.len() as u64 > u64::from(u32::MAX) {
        return Err(too_large());
    }
    let count = u16::try_from(pe.sections.len() + sections.len()).map_err(|_| too_large())?;
    put_u16(&mut out, pe.coff + 2, count);
    let size_of_image = align(next_va, pe.section_alignment);
    put_u32(
        &mut out,
        pe.optional + 56,
        u32::try_from(size_of_image).map_err(|_| too_large())?,
    );
    put_u32(
        &mut out,
        pe.optional + 8,
        u32::try_from(initialized).unwrap_or(u32::MAX),
    );
    put_u32(&mut out, pe.certificate_entry(), 0);
    put_u32(&mut out, pe.certificate_entry() + 4, 0);
    let sum = checksum(&out, pe.checksum_field());
    put_u32(&mut out, pe.checksum_field(), sum);
    Ok(out)
}

/// The PE checksum of `bytes` (whose `CheckSum` field is at `field`, left out of the sum): the
/// 16-bit one's-complement-style sum that `imagehlp`'s `CheckSumMappedFile` computes, plus the
/// file's length.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    // Every 16-bit word summed as a plain (wide) integer, eight bytes at a time; the checksum
    // field's two words taken back out exactly; then the carries folded, which equals folding
    // after each addition.
    let word = |at: usize| -> u64 {
        u64::from(bytes.get(at).copied().unwrap_or(0))
            | (u64::from(bytes.get(at + 1).copied().unwrap_or(0)) << 8)
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut sum: u64 = 0;
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        sum += (w & 0xffff) + ((w >> 16) & 0xffff) + ((w >> 32) & 0xffff) + (w >> 48);
    }
    let tail_start = bytes.len() - chunks.remainder().len();
    for at in (tail_start..bytes.len()).step_by(2) {
        sum += word(at);
    }
    if field + 4 <= bytes.len() {
        sum -= word(field) + word(field + 2);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (sum as u32).wrapping_add(bytes.len() as u32)
}

/// The Authenticode SHA-256 of a PE image, as Secure Boot computes it: the headers without the
/// checksum field and the certificate table entry, then every section's raw data in file order,
/// then the file from the count of bytes hashed so far up to the certificate table (trailing
/// data, as EDK2 and sbsigntool count it). Sign an image padded to 8 bytes
/// ([`pad_for_signing`]), so that the table appended later follows the bytes hashed here.
pub fn authenticode_sha256(bytes: &[u8], what: &str) -> Result<[u8; 32], PeError> {
    let pe = Pe::parse(bytes, what)?;
    let mut h = Sha256::new();
    let headers = (pe.size_of_headers as usize).min(bytes.len());
    let checksum = pe.checksum_field();
    let cert = pe.certificate_entry();
    h.update(&bytes[..checksum]);
    h.update(&bytes[checksum + 4..cert]);
    h.update(&bytes[cert + 8..headers]);
    let mut sections: Vec<&Section> = pe.sections.iter().filter(|s| s.raw_size > 0).collect();
    sections.sort_by_key(|s| s.raw_offset);
    // As UEFI firmware (EDK2) counts: the bytes hashed so far, whatever gaps there were.
    let mut hashed = headers;
    for s in sections {
        let start = s.raw_offset as usize;
        let end = start + s.raw_size as usize;
        h.update(&bytes[start..end]);
        hashed += s.raw_size as usize;
    }
    let end = pe.unsigned_len(bytes);
    if end > hashed {
        h.update(&bytes[hashed..end]);
    }
    Ok(h.finalize().into())
}

/// `image` without a certificate table, padded with zeros to a multiple of 8 bytes: where a
/// certificate table will start.
pub fn pad_for_signing(image: &[u8], what: &str) -> Result<Vec<u8>, PeError> {
    let pe = Pe::parse(image, what)?;
    let mut out = image[..pe.unsigned_len(image)].to_vec();
    out.resize(align(out.len() as u64, 8) as usize, 0);
    if pe.certificates.is_some() {
        put_u32(&mut out, pe.certificate_entry(), 0);
        put_u32(&mut out, pe.certificate_entry() + 4, 0);
    }
    Ok(out)
}

/// `image` with `certificate` (a `WIN_CERTIFICATE` blob, already padded to 8 bytes) as its
/// certificate table: appended at an 8-byte aligned end, the directory entry pointing at it and
/// the checksum updated. An earlier signature is replaced.
pub fn with_certificate_table(
    image: &[u8],
    certificate: &[u8],
    what: &str,
) -> Result<Vec<u8>, PeError> {
    let pe = Pe::parse(image, what)?;
    let mut out = image[..pe.unsigned_len(image)].to_vec();
    out.resize(align(out.len() as u64, 8) as usize, 0);
    let too_large = || PeError::TooLarge {
        what: what.to_string(),
    };
    let offset = u32::try_from(out.len()).map_err(|_| too_large())?;
    out.extend_from_slice(certificate);
    let size = u32::try_from(certificate.len()).map_err(|_| too_large())?;
    put_u32(&mut out, pe.certificate_entry(), offset);
    put_u32(&mut out, pe.certificate_entry() + 4, size);
    let sum = checksum(&out, pe.checksum_field());
    put_u32(&mut out, pe.checksum_field(), sum);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal PE32+ image: headers of `header_size` bytes, one `.text` section.
    pub(crate) fn tiny_pe(header_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; header_size as usize + 0x200];
        b[..2].copy_from_slice(b"MZ");
        put_u32(&mut b, 0x3c, 0x80);
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        put_u16(&mut b, coff, 0x8664);
        put_u16(&mut b, coff + 2, 1);
        put_u16(&mut b, coff + 16, 240);
        let opt = coff + 20;
        put_u16(&mut b, opt, PE32_PLUS);
        put_u32(&mut b, opt + 32, 0x200);
        put_u32(&mut b, opt + 36, 0x200);
        put_u32(&mut b, opt + 56, 0x1000 + 0x200);
        put_u32(&mut b, opt + 60, header_size);
        put_u32(&mut b, opt + 108, 16);
        let table = opt + 240;
        b[table..table + 5].copy_from_slice(b".text");
        put_u32(&mut b, table + 8, 0x10);
        put_u32(&mut b, table + 12, 0x1000);
        put_u32(&mut b, table + 16, 0x200);
        put_u32(&mut b, table + 20, header_size);
        put_u32(&mut b, table + 36, 0x6000_0020);
        b[header_size as usize..header_size as usize + 4].copy_from_slice(&[0xc3, 0, 0, 0]);
        b
    }

    #[test]
    fn sections_are_appended_aligned_and_read_back() {
        let stub = tiny_pe(0x400);
        let kernel = vec![7u8; 5000];
        let out = add_sections(
            &stub,
            &[(".osrel", b"NAME=kiln\n"), (".linux", &kernel)],
            "stub",
        )
        .unwrap();
        let pe = Pe::parse(&out, "uki").unwrap();
        let names: Vec<&str> = pe.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [".text", ".osrel", ".linux"]);
        assert_eq!(pe.section(&out, ".osrel").unwrap(), b"NAME=kiln\n");
        assert_eq!(pe.section(&out, ".linux").unwrap(), &kernel[..]);
        for s in &pe.sections[1..] {
            assert_eq!(s.virtual_address % 4096, 0, "{s:?}");
            assert_eq!(s.raw_offset % 0x200, 0, "{s:?}");
        }
        let last = pe.sections.last().unwrap();
        assert!(pe.size_of_image >= last.virtual_address + last.virtual_size);
        assert_eq!(
            u32_at(&out, pe.checksum_field()).unwrap(),
            checksum(&out, pe.checksum_field())
        );
    }

    #[test]
    fn too_many_sections_or_garbage_are_refused() {
        let stub = tiny_pe(0x200);
        let room = (0x200 - (0x84 + 20 + 240 + 40)) / 40;
        let many: Vec<(&str, &[u8])> = (0..room + 1).map(|_| (".x", &b"1"[..])).collect();
        assert!(matches!(
            add_sections(&stub, &many, "stub"),
            Err(PeError::NoRoom { .. })
        ));
        assert!(matches!(
            Pe::parse(b"MZ\0\0", "junk"),
            Err(PeError::Malformed { .. })
        ));
        let mut cut = tiny_pe(0x400);
        cut.truncate(0x300);
        assert!(matches!(
            Pe::parse(&cut, "cut"),
            Err(PeError::Malformed { .. })
        ));
    }

    #[test]
    fn the_authenticode_digest_ignores_checksum_and_signature() {
        let stub = tiny_pe(0x400);
        let a = authenticode_sha256(&stub, "a").unwrap();
        let signed = with_certificate_table(&stub, &[1u8; 16], "a").unwrap();
        assert_eq!(authenticode_sha256(&signed, "a").unwrap(), a);
        let pe = Pe::parse(&signed, "a").unwrap();
        assert_eq!(pe.certificates, Some((stub.len() as u32, 16)));
        let mut changed = stub.clone();
        changed[0x400] ^= 1;
        assert_ne!(authenticode_sha256(&changed, "a").unwrap(), a);
    }
}
