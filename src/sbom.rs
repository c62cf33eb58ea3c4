//! The software bill of materials of an image: an SPDX 2.3 JSON document listing the image
//! (its disk digest) and every Debian package in it — name, version, architecture, source
//! package and version, the `.deb`'s SHA-256 from the signed index, where it was downloaded,
//! and a `pkg:deb/debian/…` purl. Busybox images list the packages kiln's own resolver fetched;
//! Debian images the packages their `/var/lib/dpkg/status` says are installed, each matched in
//! the verified index. Besides the packages, the files kiln itself wrote into the root (its
//! init, units, accounts, fstab, the recipe's files) are listed as SPDX files with their SHA-1
//! and SHA-256. Pure: no I/O.

use crate::digest::Digest256;
use crate::packages::PackageRef;
use serde_json::{Value, json};

/// Where dpkg records what is installed.
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// One package the document lists.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SbomPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub source: String,
    pub source_version: String,
    /// The `.deb`'s SHA-256 and path below the mirror, from the signed index (when found there).
    pub deb: Option<(Digest256, String)>,
}

impl SbomPackage {
    /// A package kiln resolved and fetched itself.
    pub fn fetched(p: &PackageRef) -> SbomPackage {
        let (source, source_version) = p.source_package();
        SbomPackage {
            name: p.name.clone(),
            version: p.version.clone(),
            architecture: p.architecture.clone(),
            source,
            source_version,
            deb: Some((p.sha256.clone(), p.filename.clone())),
        }
    }
}

/// The packages dpkg's status file says are installed (`Status: install ok installed`), with
/// their source package (`Source: name (version)`, `Source: name`, or none: the binary's own).
pub fn parse_dpkg_status(text: &str) -> Vec<SbomPackage> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            })
        };
        let (Some(name), Some(version), Some(status)) =
            (field("Package"), field("Version"), field("Status"))
        else {
            continue;
        };
        if status != "install ok installed" {
            continue;
        }
        let (source, source_version) = match field("Source") {
            Some(s) => match s.split_once(' ') {
                Some((n, v)) => (
                    n.to_string(),
                    v.trim()
                        .trim_start_matches('(')
                        .trim_end_matches(')')
                        .to_string(),
                ),
                None => (s, version.clone()),
            },
            None => (name.clone(), version.clone()),
        };
        out.push(SbomPackage {
            architecture: field("Architecture").unwrap_or_default(),
            name,
            version,
            source,
            source_version,
            deb: None,
        });
    }
    out
}

/// A file kiln wrote into the image's root itself (no package holds it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GeneratedFile {
    /// Absolute path in the image.
    pub path: String,
    pub sha256: Digest256,
    /// Hex SHA-1: SPDX 2.3 requires one for every file.
    pub sha1: String,
}

/// The regular files of `image` that kiln generated: those not in `base` with the same content
/// (a Debian image's mmdebstrap base) and not at a path in `packaged` (a busybox image's
/// `/bin/busybox`). Path order.
pub fn generated_paths<'a>(
    image: &'a crate::manifest::Manifest,
    base: Option<&crate::manifest::Manifest>,
    packaged: &[&str],
) -> Vec<(&'a str, &'a Digest256)> {
    use crate::manifest::ManifestKind;
    let from_base: std::collections::HashMap<&str, &Digest256> = base
        .map(|b| {
            b.entries
                .iter()
                .filter_map(|e| match &e.kind {
                    ManifestKind::File { digest, .. } => Some((e.path.as_str(), digest)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<(&str, &Digest256)> = image
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            ManifestKind::File { digest, .. }
                if from_base.get(e.path.as_str()) != Some(&digest)
                    && !packaged.contains(&e.path.as_str()) =>
            {
                Some((e.path.as_str(), digest))
            }
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// What the document describes.
pub struct SbomInput<'a> {
    /// The recipe's name and version.
    pub name: &'a str,
    pub version: &'a str,
    /// The disk image's digest.
    pub image: &'a Digest256,
    /// SOURCE_DATE_EPOCH of the build: the document's creation time.
    pub source_date_epoch: i64,
    /// The Debian mirror the packages came from, and the suite.
    pub mirror: &'a str,
    pub suite: &'a str,
    pub packages: Vec<SbomPackage>,
    /// The files kiln wrote itself.
    pub generated: &'a [GeneratedFile],
}

/// The SPDX id of the package of kiln's own files.
const GENERATED_ID: &str = "SPDXRef-kiln-generated";

/// SPDX's package verification code: the SHA-1 of the files' sorted SHA-1s (hex) joined.
fn verification_code(files: &[GeneratedFile]) -> String {
    let mut sums: Vec<&str> = files.iter().map(|f| f.sha1.as_str()).collect();
    sums.sort_unstable();
    crate::digest::sha1_hex(sums.concat().as_bytes())
}

/// The SPDX id of a package: `SPDXRef-deb-<name>-<arch>`, with characters SPDX ids may not hold
/// (anything but letters, digits, `.` and `-`) as `-`.
fn spdx_id(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("SPDXRef-deb-{clean}")
}

/// `pkg:deb/debian/<name>@<version>?arch=<arch>&distro=<suite>`.
pub fn purl(p: &SbomPackage, suite: &str) -> String {
    format!(
        "pkg:deb/debian/{}@{}?arch={}&distro={}",
        crate::net::percent_encode(&p.name),
        crate::net::percent_encode(&p.version),
        crate::net::percent_encode(&p.architecture),
        crate::net::percent_encode(suite)
    )
}

/// The SPDX 2.3 document (JSON). The same input gives the same bytes.
pub fn spdx(input: &SbomInput<'_>) -> Value {
    let created = crate::time::rfc3339(
        input.source_date_epoch.saturating_mul(1000),
        crate::time::Precision::Seconds,
    );
    let mut packages = vec![json!({
        "SPDXID": "SPDXRef-Image",
        "name": input.name,
        "versionInfo": if input.version.is_empty() { "NOASSERTION" } else { input.version },
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "checksums": [{"algorithm": "SHA256", "checksumValue": input.image.hex()}],
        "supplier": "NOASSERTION",
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    let mut sorted: Vec<&SbomPackage> = input.packages.iter().collect();
    sorted.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
    sorted.dedup_by(|a, b| a.name == b.name && a.architecture == b.architecture);
    for p in &sorted {
        let id = spdx_id(&format!("{}-{}", p.name, p.architecture));
        let mut package = json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "primaryPackagePurpose": "LIBRARY",
            "sourceInfo": format!(
                "built from Debian source package {} {}",
                p.source, p.source_version
            ),
            "supplier": "Organization: Debian",
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(p, input.suite),
            }],
        });
        if let Some((sha256, filename)) = &p.deb {
            package["downloadLocation"] =
                format!("{}/{filename}", input.mirror.trim_end_matches('/')).into();
            package["checksums"] = json!([{"algorithm": "SHA256", "checksumValue": sha256.hex()}]);
        }
        packages.push(package);
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    // kiln's own files: a package of their own whose files were analysed (SPDX lets a package
    // that was not analysed, like the image, contain no files).
    let mut files = Vec::new();
    if !input.generated.is_empty() {
        let mut ids = Vec::new();
        for (i, f) in input.generated.iter().enumerate() {
            let id = format!("SPDXRef-File-{}", i + 1);
            files.push(json!({
                "SPDXID": id,
                "fileName": format!(".{}", f.path),
                "checksums": [
                    {"algorithm": "SHA1", "checksumValue": f.sha1},
                    {"algorithm": "SHA256", "checksumValue": f.sha256.hex()},
                ],
                "licenseConcluded": "NOASSERTION",
                "copyrightText": "NOASSERTION",
            }));
            relationships.push(json!({
                "spdxElementId": GENERATED_ID,
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": id,
            }));
            ids.push(id);
        }
        packages.push(json!({
            "SPDXID": GENERATED_ID,
            "name": "kiln-generated-files",
            "versionInfo": if input.version.is_empty() { "NOASSERTION" } else { input.version },
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": true,
            "packageVerificationCode": {"packageVerificationCodeValue": verification_code(input.generated)},
            "hasFiles": ids,
            "comment": "the files kiln wrote into the root itself: init, units, accounts, fstab, the recipe's files",
            "supplier": format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION")),
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
        }));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": GENERATED_ID,
        }));
    }
    let mut doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": if input.version.is_empty() { input.name.to_string() } else { format!("{}-{}", input.name, input.version) },
        "documentNamespace": format!(
            "https://spdx.kiln.invalid/{}/{}",
            crate::net::percent_encode(input.name),
            input.image.hex()
        ),
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "relationships": relationships,
    });
    if !files.is_empty() {
        doc["files"] = files.into();
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(name: &str, version: &str, source: Option<&str>) -> PackageRef {
        serde_json::from_value(json!({
            "name": name, "version": version, "architecture": "amd64",
            "filename": format!("pool/main/x/{name}.deb"), "size": 1,
            "sha256": Digest256::of(name.as_bytes()), "essential": false, "priority": null,
            "source": source,
        }))
        .unwrap()
    }

    #[test]
    fn packages_sources_and_purls() {
        let image = Digest256::of(b"disk");
        let a = package("busybox-static", "1:1.35.0-4+b3", Some("busybox"));
        let b = package(
            "linux-image-6.1.0-1-cloud-amd64",
            "6.1.1-1",
            Some("linux-signed-amd64 (6.1.1+1)"),
        );
        let doc = spdx(&SbomInput {
            name: "app",
            version: "1.0",
            image: &image,
            source_date_epoch: 1_700_000_000,
            mirror: "http://deb.debian.org/debian/",
            suite: "bookworm",
            packages: vec![SbomPackage::fetched(&b), SbomPackage::fetched(&a)],
            generated: &[GeneratedFile {
                path: "/sbin/init".into(),
                sha256: Digest256::of(b"init"),
                sha1: "00".repeat(20),
            }],
        });
        let p = &doc["packages"];
        assert_eq!(p.as_array().unwrap().len(), 4);
        assert_eq!(p[1]["name"], "busybox-static");
        assert_eq!(
            p[1]["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/busybox-static@1%3A1.35.0-4%2Bb3?arch=amd64&distro=bookworm"
        );
        assert_eq!(
            p[1]["sourceInfo"],
            "built from Debian source package busybox 1:1.35.0-4+b3"
        );
        assert_eq!(
            p[2]["sourceInfo"],
            "built from Debian source package linux-signed-amd64 6.1.1+1"
        );
        assert_eq!(
            p[1]["downloadLocation"],
            "http://deb.debian.org/debian/pool/main/x/busybox-static.deb"
        );
        assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(doc["relationships"].as_array().unwrap().len(), 5);
        assert_eq!(p[3]["hasFiles"][0], "SPDXRef-File-1");
        assert_eq!(
            p[3]["packageVerificationCode"]["packageVerificationCodeValue"],
            crate::digest::sha1_hex("00".repeat(20).as_bytes())
        );
        assert_eq!(doc["files"][0]["fileName"], "./sbin/init");
        assert_eq!(doc["files"][0]["checksums"][0]["algorithm"], "SHA1");
        assert_eq!(spdx_id("g++_x"), "SPDXRef-deb-g---x");
    }

    #[test]
    fn generated_files_are_those_neither_base_nor_package_has() {
        use crate::manifest::{Manifest, ManifestEntry, ManifestKind};
        let file = |path: &str, content: &[u8]| ManifestEntry {
            path: path.into(),
            kind: ManifestKind::File {
                digest: Digest256::of(content),
                len: content.len() as u64,
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Default::default(),
        };
        let base = Manifest {
            v: 1,
            entries: vec![file("/etc/passwd", b"root"), file("/usr/bin/ls", b"ls")],
        };
        let image = Manifest {
            v: 1,
            entries: vec![
                file("/usr/bin/ls", b"ls"),
                file("/etc/passwd", b"root\napp"),
                file("/bin/busybox", b"bb"),
                file("/etc/fstab", b"/"),
            ],
        };
        let paths: Vec<&str> = generated_paths(&image, Some(&base), &["/bin/busybox"])
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(paths, ["/etc/fstab", "/etc/passwd"]);
    }

    #[test]
    fn dpkg_status_lists_installed_packages_with_their_sources() {
        let text = "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\n\
                    Source: glibc\nVersion: 2.36-9\n\n\
                    Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                    Package: libssl3\nStatus: install ok installed\nArchitecture: amd64\n\
                    Source: openssl (3.0.1-1)\nVersion: 3.0.1-1+b1\n\n\
                    Package: bash\nStatus: install ok installed\nArchitecture: amd64\n\
                    Version: 5.2-2\nDescription: x\n more\n";
        let p = parse_dpkg_status(text);
        let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["libc6", "libssl3", "bash"]);
        assert_eq!(
            (p[0].source.as_str(), p[0].source_version.as_str()),
            ("glibc", "2.36-9")
        );
        assert_eq!(
            (p[1].source.as_str(), p[1].source_version.as_str()),
            ("openssl", "3.0.1-1")
        );
        assert_eq!(
            (p[2].source.as_str(), p[2].source_version.as_str()),
            ("bash", "5.2-2")
        );
    }
}
