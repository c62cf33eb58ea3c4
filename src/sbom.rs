//! The software bill of materials of an image: an SPDX 2.3 JSON document listing the image
//! (its disk digest) and every Debian package in it — name, version, architecture, source
//! package and version, the `.deb`'s SHA-256 from the signed index, where it was downloaded,
//! and a `pkg:deb/debian/…` purl. Busybox images list the packages kiln's own resolver fetched;
//! Debian images the packages their `/var/lib/dpkg/status` says are installed, each matched in
//! the verified index. Pure: no I/O.

use crate::digest::Digest256;
use crate::packages::PackageRef;
use serde_json::{Value, json};

/// Where dpkg records what is installed.
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// One package the document lists.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    json!({
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
    })
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
        });
        let p = &doc["packages"];
        assert_eq!(p.as_array().unwrap().len(), 3);
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
        assert_eq!(doc["relationships"].as_array().unwrap().len(), 3);
        assert_eq!(spdx_id("g++_x"), "SPDXRef-deb-g---x");
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
