//! Writing DER (ITU-T X.690) by hand for the few fixed structures kiln signs: X.509
//! certificates, PKCS#7 SignedData for Authenticode and UEFI authenticated variables. Each
//! function returns one complete TLV; constructed values take their already-encoded parts.
//! Reading is only splitting TLVs ([`split_tlv`]): enough to find a certificate's fields.

/// One TLV with `tag` around `content`.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// SEQUENCE of the parts, in order.
pub fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// SET OF the parts, sorted as DER requires.
pub fn set_of(parts: &[&[u8]]) -> Vec<u8> {
    let mut sorted: Vec<&[u8]> = parts.to_vec();
    sorted.sort();
    tlv(0x31, &sorted.concat())
}

/// A context-specific constructed tag `[n]` around the parts (EXPLICIT, or IMPLICIT for a
/// constructed type whose own tag it replaces).
pub fn context(n: u8, parts: &[&[u8]]) -> Vec<u8> {
    tlv(0xa0 | n, &parts.concat())
}

/// INTEGER from unsigned big-endian bytes (leading zeros dropped, a zero added when the high
/// bit is set).
pub fn integer(unsigned_be: &[u8]) -> Vec<u8> {
    let skip = unsigned_be
        .iter()
        .take_while(|&&b| b == 0)
        .count()
        .min(unsigned_be.len().saturating_sub(1));
    let mut v = unsigned_be[skip..].to_vec();
    if v.is_empty() {
        v.push(0);
    }
    if v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    tlv(0x02, &v)
}

/// OBJECT IDENTIFIER from its dotted form (a constant in this crate: panics on a malformed one
/// are programming errors caught by the tests).
pub fn oid(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted
        .split('.')
        .map(|a| a.parse().expect("a numeric OID arc"))
        .collect();
    let mut body = vec![(arcs[0] * 40 + arcs[1]) as u8];
    for &arc in &arcs[2..] {
        let mut chunk = vec![(arc & 0x7f) as u8];
        let mut rest = arc >> 7;
        while rest > 0 {
            chunk.push(0x80 | (rest & 0x7f) as u8);
            rest >>= 7;
        }
        chunk.reverse();
        body.extend(chunk);
    }
    tlv(0x06, &body)
}

pub fn null() -> Vec<u8> {
    vec![0x05, 0x00]
}

pub fn octet_string(bytes: &[u8]) -> Vec<u8> {
    tlv(0x04, bytes)
}

/// BIT STRING with no unused bits.
pub fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(bytes);
    tlv(0x03, &v)
}

pub fn utf8_string(text: &str) -> Vec<u8> {
    tlv(0x0c, text.as_bytes())
}

pub fn boolean(value: bool) -> Vec<u8> {
    vec![0x01, 0x01, if value { 0xff } else { 0x00 }]
}

/// GeneralizedTime `YYYYMMDDHHMMSSZ`.
pub fn generalized_time(text: &str) -> Vec<u8> {
    tlv(0x18, text.as_bytes())
}

/// UTCTime `YYMMDDHHMMSSZ`.
pub fn utc_time(text: &str) -> Vec<u8> {
    tlv(0x17, text.as_bytes())
}

/// An AlgorithmIdentifier with NULL parameters.
pub fn algorithm(dotted: &str) -> Vec<u8> {
    sequence(&[&oid(dotted), &null()])
}

/// One TLV read from the front of a buffer.
pub struct Tlv<'a> {
    pub tag: u8,
    /// Tag, length and content.
    pub whole: &'a [u8],
    pub content: &'a [u8],
    /// What follows it.
    pub rest: &'a [u8],
}

/// The TLV at the start of `der`, or `None` when it is cut short or its length does not fit.
pub fn split_tlv(der: &[u8]) -> Option<Tlv<'_>> {
    let tag = *der.first()?;
    let first = *der.get(1)?;
    let (len, start) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 8 {
            return None;
        }
        let mut len = 0usize;
        for &b in der.get(2..2 + n)? {
            len = len.checked_mul(256)?.checked_add(usize::from(b))?;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some(Tlv {
        tag,
        whole: der.get(..end)?,
        content: der.get(start..end)?,
        rest: der.get(end..)?,
    })
}

/// The content octets of one TLV (its value without tag and length), or `None` when `der` is
/// not one whole TLV.
pub fn content_of(der: &[u8]) -> Option<&[u8]> {
    let tlv = split_tlv(der)?;
    tlv.rest.is_empty().then_some(tlv.content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_x690() {
        assert_eq!(
            oid("1.2.840.113549.1.7.2"),
            [
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02
            ]
        );
        assert_eq!(integer(&[0x00, 0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(integer(&[0, 0, 1]), [0x02, 0x01, 0x01]);
        assert_eq!(integer(&[0]), [0x02, 0x01, 0x00]);
        let long = tlv(0x04, &[7u8; 300]);
        assert_eq!(&long[..4], [0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(content_of(&long).unwrap(), &[7u8; 300][..]);
        assert_eq!(
            set_of(&[&[0x02, 0x01, 0x05], &[0x02, 0x01, 0x01]]),
            [0x31, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x05]
        );
        assert_eq!(content_of(&[0x30, 0x05, 0]), None);
    }
}
