//! The Debian archive client against the real Debian mirror (downloads cached in
//! /var/tmp/kiln-test-cache so reruns are fast) and against loopback HTTP servers that misbehave:
//! a closed port, a tampered InRelease, a tampered .deb, a connection that drops mid-download.

use kiln::home::BlobStore;
use kiln::packages::{Archive, ArchiveOptions, Deps, PackagesError, deb};
use kiln::tree::{EntryKind, Tree, TreePath};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

mod common;
use common::sha256_bytes;

const SHARED_CACHE: &str = "/var/tmp/kiln-test-cache";

fn real_options(home: &Path) -> ArchiveOptions {
    let mut opts = ArchiveOptions::new(home);
    opts.mirror = kiln::packages::default_mirror();
    opts
}

/// One archive per test binary, on the shared cache.
fn real() -> &'static Archive {
    static ARCHIVE: OnceLock<Archive> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let started = Instant::now();
        let archive = Archive::open(real_options(Path::new(SHARED_CACHE))).unwrap();
        eprintln!(
            "opened {} with {} packages in {:.1?} ({} requests)",
            archive.scope(),
            archive.index().unwrap().len(),
            started.elapsed(),
            archive.network_requests()
        );
        archive
    })
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn busybox_static_reads_into_a_tree() {
    let archive = real();
    let pkgs = archive.resolve(&["busybox-static"], Deps::None).unwrap();
    assert_eq!(pkgs.len(), 1);
    assert_eq!(pkgs[0].name, "busybox-static");
    let path = archive.fetch(&pkgs[0]).unwrap();
    let store = BlobStore::new(SHARED_CACHE);
    assert_eq!(path, store.path(&pkgs[0].sha256));

    let mut tree = Tree::new();
    let info = deb::read_into_tree(&path, &pkgs[0].deb_limits(), &mut tree, &store).unwrap();
    assert_eq!(info.field("Package"), Some("busybox-static"));
    assert_eq!(info.field("Version"), Some(pkgs[0].version.as_str()));
    assert!(info.files.contains(&"bin/busybox".to_string()));
    let bb = tree.get(&TreePath::new("bin/busybox").unwrap()).unwrap();
    assert_eq!((bb.mode, bb.uid, bb.gid), (0o755, 0, 0));
    let EntryKind::File(content) = &bb.kind else {
        panic!("/bin/busybox is a {}", bb.kind.name());
    };
    let mut head = [0u8; 4];
    content.open().unwrap().read_exact(&mut head).unwrap();
    assert_eq!(&head, b"\x7fELF");
    tree.validate().unwrap();
}

#[test]
fn kernel_metapackage_resolves_to_the_versioned_image() {
    let archive = real();
    // Standalone: only the metapackage.
    let alone = archive
        .resolve(&["linux-image-cloud-amd64"], Deps::None)
        .unwrap();
    assert_eq!(alone.len(), 1);
    let all = archive
        .resolve(&["linux-image-cloud-amd64"], Deps::All)
        .unwrap();
    let image = all
        .iter()
        .find(|p| {
            p.name.starts_with("linux-image-6.1.0-")
                && p.name.ends_with("-cloud-amd64")
                && p.name != "linux-image-cloud-amd64"
        })
        .unwrap_or_else(|| panic!("no versioned image in {all:?}"));
    // Sorted by name, deterministic.
    let mut names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        all.iter().map(|p| p.name.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(
        all,
        archive
            .resolve(&["linux-image-cloud-amd64"], Deps::All)
            .unwrap()
    );
    for pkg in [&alone[0], image] {
        let path = archive.fetch(pkg).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), pkg.size);
    }
}

#[test]
fn systemd_boot_efi_has_the_loader() {
    let archive = real();
    let pkgs = archive.resolve(&["systemd-boot-efi"], Deps::None).unwrap();
    let path = archive.fetch(&pkgs[0]).unwrap();
    let mut tree = Tree::new();
    let store = BlobStore::new(SHARED_CACHE);
    deb::read_into_tree(&path, &pkgs[0].deb_limits(), &mut tree, &store).unwrap();
    let efi = tree
        .get(&TreePath::new("usr/lib/systemd/boot/efi/systemd-bootx64.efi").unwrap())
        .expect("systemd-bootx64.efi in the tree");
    let EntryKind::File(content) = &efi.kind else {
        panic!("not a file");
    };
    let mut mz = [0u8; 2];
    content.open().unwrap().read_exact(&mut mz).unwrap();
    assert_eq!(&mz, b"MZ");
}

#[test]
fn warm_cache_makes_no_request() {
    let warm = real();
    let pkgs = warm.resolve(&["busybox-static"], Deps::None).unwrap();
    warm.fetch(&pkgs[0]).unwrap();

    // A second run on the same cache: no request at all.
    let again = Archive::open(real_options(Path::new(SHARED_CACHE))).unwrap();
    let pkgs = again.resolve(&["busybox-static"], Deps::None).unwrap();
    again.fetch(&pkgs[0]).unwrap();
    assert_eq!(again.network_requests(), 0);
    assert_eq!(again.release_digest(), warm.release_digest());

    // Offline with a stale InRelease: still served from the cache, still no request.
    let mut opts = real_options(Path::new(SHARED_CACHE));
    opts.fetch.offline = true;
    opts.release_max_age = Duration::ZERO;
    let offline = Archive::open(opts).unwrap();
    let pkgs = offline.resolve(&["busybox-static"], Deps::None).unwrap();
    offline.fetch(&pkgs[0]).unwrap();
    assert_eq!(offline.network_requests(), 0);

    // Offline on a mirror never seen: a clear error, no request.
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ArchiveOptions::new(dir.path());
    opts.mirror = "http://127.0.0.1:9/debian".into();
    opts.fetch.offline = true;
    let err = Archive::open(opts)
        .err()
        .expect("offline without cache fails");
    assert!(matches!(err, PackagesError::Offline { .. }), "{err}");
    assert!(err.to_string().contains("KILN_OFFLINE"), "{err}");
}

#[test]
fn unknown_package_names_it_and_the_suite() {
    let err = real().resolve(&["busybox-statik"], Deps::All).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("package `busybox-statik` is not in Debian bookworm (main, amd64)"),
        "{msg}"
    );
    assert!(msg.contains("did you mean `busybox-static`?"), "{msg}");
}

#[test]
fn unreachable_mirror_gives_up_quickly() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ArchiveOptions::new(dir.path());
    opts.mirror = format!("http://127.0.0.1:{port}/debian");
    let started = Instant::now();
    let err = Archive::open(opts).err().expect("closed port must fail");
    let elapsed = started.elapsed();
    let msg = err.to_string();
    eprintln!("after {elapsed:.1?}: {msg}");
    assert!(
        matches!(err, PackagesError::Unreachable { tries: 4, .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "http://127.0.0.1:{port}/debian/dists/bookworm/InRelease"
        )),
        "{msg}"
    );
    assert!(msg.contains("did not answer after 4 tries"), "{msg}");
    assert!(msg.contains("KILN_DEBIAN_MIRROR"), "{msg}");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert!(files_under(dir.path()).is_empty());
}

/// What the loopback mirror answers for one request.
type Handler = dyn Fn(&str, Option<u64>, usize) -> Reply + Send + Sync;

enum Reply {
    NotFound,
    /// An error status with an empty body.
    Status(u16),
    /// Wait this long before answering 404 (a stalled server).
    Stall(Duration),
    /// Full body (200), or from the requested offset (206) when a Range came.
    Body(Vec<u8>),
    /// Announce the whole length but send only the first `n` bytes, then close.
    Truncated(Vec<u8>, usize),
    /// Announce the whole length, send the first `n` bytes, then one byte per interval.
    Trickle(Vec<u8>, usize, Duration),
}

/// A tiny HTTP/1.1 server on a free loopback port; returns its base URL and a request counter.
fn serve(handler: Arc<Handler>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/debian", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &*handler, n);
            });
        }
    });
    (base, count)
}

fn answer(stream: TcpStream, handler: &Handler, n: usize) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse::<u64>().ok();
        }
    }
    let mut out = stream;
    match handler(&path, range, n) {
        Reply::Status(code) => write!(
            out,
            "HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
        Reply::Stall(wait) => {
            std::thread::sleep(wait);
            out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?
        }
        Reply::NotFound => out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
        Reply::Body(body) => {
            let from = range.unwrap_or(0).min(body.len() as u64) as usize;
            let status = if range.is_some() {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            write!(
                out,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len() - from
            )?;
            out.write_all(&body[from..])?;
        }
        Reply::Truncated(body, keep) => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(&body[..keep])?;
        }
        Reply::Trickle(body, keep, every) => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(&body[..keep])?;
            out.flush()?;
            for b in &body[keep..] {
                std::thread::sleep(every);
                out.write_all(&[*b])?;
                out.flush()?;
            }
        }
    }
    out.flush()
}

/// The real InRelease, Packages.xz and busybox-static .deb bytes, from the shared cache.
struct Real {
    inrelease: Vec<u8>,
    packages_xz: Vec<u8>,
    deb_path: String,
    deb: Vec<u8>,
}

fn real_files() -> Real {
    let archive = real();
    let xz = &archive.release().sha256["main/binary-amd64/Packages.xz"];
    let xz_digest = kiln::digest::Digest256::parse(&format!("sha256:{}", xz.sha256)).unwrap();
    let store = BlobStore::new(SHARED_CACHE);
    let packages_xz = match std::fs::read(store.path(&xz_digest)) {
        Ok(b) => b,
        // The compressed index was never downloaded (the uncompressed one was already
        // cached): fetch it once through a fresh home.
        Err(_) => {
            let dir = tempfile::tempdir().unwrap();
            let fresh = Archive::open(real_options(dir.path())).unwrap();
            std::fs::read(fresh.store().path(&xz_digest)).unwrap()
        }
    };
    let pkg = archive.resolve(&["busybox-static"], Deps::None).unwrap();
    let deb = std::fs::read(archive.fetch(&pkg[0]).unwrap()).unwrap();
    Real {
        inrelease: archive.inrelease().to_vec(),
        packages_xz,
        deb_path: format!("/debian/{}", pkg[0].filename),
        deb,
    }
}

/// A mirror that serves `inrelease` and the real index, and `deb` for busybox-static.
fn fake_mirror(real: &Real, inrelease: Vec<u8>, deb: Reply) -> (String, Arc<AtomicUsize>) {
    let xz = real.packages_xz.clone();
    let deb_path = real.deb_path.clone();
    let deb = std::sync::Mutex::new(Some(deb));
    let full_deb = real.deb.clone();
    serve(Arc::new(move |path: &str, _range, _n| {
        if path == "/debian/dists/bookworm/InRelease" {
            Reply::Body(inrelease.clone())
        } else if path.starts_with("/debian/dists/bookworm/main/binary-amd64/")
            && (path.ends_with("Packages.xz") || path.contains("/by-hash/SHA256/"))
        {
            Reply::Body(xz.clone())
        } else if path == deb_path {
            // The scripted reply once, the real file afterwards (for resumes).
            deb.lock()
                .unwrap()
                .take()
                .unwrap_or_else(|| Reply::Body(full_deb.clone()))
        } else {
            Reply::NotFound
        }
    }))
}

#[test]
fn tampered_inrelease_is_refused_and_nothing_cached() {
    let real = real_files();
    let text = String::from_utf8(real.inrelease.clone()).unwrap();
    // Change one hash digit inside the signed text.
    let pos = text.find("main/binary-amd64/Packages.xz").unwrap() - 20;
    let mut bytes = text.into_bytes();
    bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
    let (mirror, _) = fake_mirror(&real, bytes, Reply::NotFound);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ArchiveOptions::new(dir.path());
    opts.mirror = mirror.clone();
    opts.fetch.tries = 1;
    let err = Archive::open(opts)
        .err()
        .expect("tampered InRelease accepted");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, PackagesError::BadSignature { .. }), "{msg}");
    assert!(msg.contains("BAD signature"), "{msg}");
    assert!(msg.contains(&mirror), "{msg}");
    assert!(
        files_under(dir.path()).is_empty(),
        "{:?}",
        files_under(dir.path())
    );

    // The same text with its signature block cut off.
    let unsigned = String::from_utf8(real.inrelease.clone()).unwrap();
    let cut = unsigned.find("-----BEGIN PGP SIGNATURE-----").unwrap();
    let (mirror, _) = fake_mirror(&real, unsigned.as_bytes()[..cut].to_vec(), Reply::NotFound);
    let mut opts = ArchiveOptions::new(dir.path());
    opts.mirror = mirror;
    let err = Archive::open(opts)
        .err()
        .expect("unsigned InRelease accepted");
    assert!(matches!(err, PackagesError::BadSignature { .. }), "{err}");
    assert!(files_under(dir.path()).is_empty());
}

#[test]
fn tampered_deb_is_refused_and_nothing_cached() {
    let real = real_files();
    let mut bad = real.deb.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let (mirror, _) = fake_mirror(&real, real.inrelease.clone(), Reply::Body(bad));
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ArchiveOptions::new(dir.path());
    opts.mirror = mirror;
    let archive = Archive::open(opts).unwrap();
    assert_eq!(archive.release_digest(), self::real().release_digest());
    let pkg = archive.resolve(&["busybox-static"], Deps::None).unwrap();
    let err = archive.fetch(&pkg[0]).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, PackagesError::HashMismatch { .. }), "{msg}");
    assert!(msg.contains("package busybox-static"), "{msg}");
    assert!(msg.contains(pkg[0].sha256.as_str()), "{msg}");
    assert!(!archive.store().contains(&pkg[0].sha256));
    let leftovers: Vec<PathBuf> = files_under(dir.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn interrupted_download_resumes() {
    let real = real_files();
    let half = real.deb.len() / 2;
    let (mirror, requests) = fake_mirror(
        &real,
        real.inrelease.clone(),
        Reply::Truncated(real.deb.clone(), half),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ArchiveOptions::new(dir.path());
    opts.mirror = mirror;
    let archive = Archive::open(opts).unwrap();
    let pkg = archive.resolve(&["busybox-static"], Deps::None).unwrap();
    let before = requests.load(Ordering::SeqCst);
    let path = archive.fetch(&pkg[0]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), real.deb);
    // The truncated answer, then one resumed request.
    assert_eq!(requests.load(Ordering::SeqCst) - before, 2);
}

#[test]
fn keyring_override_is_used() {
    use pgp::composed::{Deserializable, SignedPublicKey};
    use pgp::ser::Serialize;
    let real = real_files();
    // Only the bullseye keys: none of them signs bookworm's InRelease.
    let mut ring = Vec::new();
    for key in
        SignedPublicKey::from_bytes_many(kiln::packages::release::DEBIAN_ARCHIVE_KEYRING).unwrap()
    {
        let key = key.unwrap();
        let bullseye = key
            .details
            .users
            .iter()
            .any(|u| String::from_utf8_lossy(u.id.id()).contains("(11/bullseye)"));
        if bullseye {
            ring.extend(key.to_bytes().unwrap());
        }
    }
    assert!(!ring.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let ring_path = dir.path().join("bullseye.gpg");
    std::fs::write(&ring_path, &ring).unwrap();
    let home = dir.path().join("home");
    let (mirror, _) = fake_mirror(&real, real.inrelease.clone(), Reply::NotFound);
    let mut opts = ArchiveOptions::new(&home);
    opts.mirror = mirror.clone();
    opts.keyring = Some(ring_path);
    let err = Archive::open(opts)
        .err()
        .expect("bookworm InRelease accepted by bullseye keys");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, PackagesError::BadSignature { .. }), "{msg}");
    assert!(msg.contains("is by a key in the keyring"), "{msg}");
    assert!(msg.contains("KILN_DEBIAN_KEYRING"), "{msg}");
    assert!(files_under(&home).is_empty());

    // A keyring path that does not exist.
    let mut opts = ArchiveOptions::new(&home);
    opts.mirror = mirror;
    opts.keyring = Some(dir.path().join("missing.gpg"));
    let err = Archive::open(opts).err().expect("missing keyring accepted");
    assert!(matches!(err, PackagesError::Keyring { .. }), "{err}");
    assert!(err.to_string().contains("missing.gpg"), "{err}");
}

#[test]
fn real_closures_resolve() {
    let archive = real();
    // The essential set plus a few base packages: real alternatives, virtual packages
    // (awk, mail-transport-agent…), `:any` qualifiers and Pre-Depends.
    let mut names = archive.index().unwrap().essential();
    names.extend([
        "systemd",
        "udev",
        "kmod",
        "e2fsprogs",
        "openssh-server",
        "python3",
    ]);
    let started = Instant::now();
    let pkgs = archive.resolve(&names, Deps::All).unwrap();
    eprintln!(
        "{} requested -> {} packages in {:.1?}",
        names.len(),
        pkgs.len(),
        started.elapsed()
    );
    for want in [
        "libc6",
        "systemd",
        "python3",
        "openssh-server",
        "dpkg",
        "base-files",
    ] {
        assert!(pkgs.iter().any(|p| p.name == want), "{want} missing");
    }
    // Every package appears once; same answer twice.
    let mut seen: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
    seen.dedup();
    assert_eq!(seen.len(), pkgs.len());
    assert_eq!(pkgs, archive.resolve(&names, Deps::All).unwrap());
}

#[test]
fn https_mirror_works_with_rustls() {
    let mut opts = ArchiveOptions::new(SHARED_CACHE);
    opts.mirror = "https://deb.debian.org/debian/".into();
    let archive = Archive::open(opts).unwrap();
    assert_eq!(archive.options().mirror, "https://deb.debian.org/debian");
    assert_eq!(archive.release().codename.as_deref(), Some("bookworm"));
    let pkgs = archive.resolve(&["busybox-static"], Deps::None).unwrap();
    // Same content-addressed cache: the .deb fetched over http serves https too.
    real()
        .fetch(&real().resolve(&["busybox-static"], Deps::None).unwrap()[0])
        .unwrap();
    if pkgs == real().resolve(&["busybox-static"], Deps::None).unwrap() {
        let before = archive.network_requests();
        archive.fetch(&pkgs[0]).unwrap();
        assert_eq!(archive.network_requests(), before);
    }
}

#[test]
fn unknown_suite_is_a_clear_error() {
    let real = real_files();
    let (mirror, _) = fake_mirror(&real, real.inrelease.clone(), Reply::NotFound);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ArchiveOptions::new(dir.path());
    opts.mirror = mirror.clone();
    opts.suite = "bookwrm".into();
    let err = Archive::open(opts).err().expect("unknown suite accepted");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, PackagesError::Http { .. }), "{msg}");
    assert!(
        msg.contains(&format!("{mirror}/dists/bookwrm/InRelease: HTTP 404")),
        "{msg}"
    );
    assert!(msg.contains("suite"), "{msg}");
    assert!(files_under(dir.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// A self-made archive signed with a key generated here: the whole flow without the Debian
// mirror, and the checks that need a signature kiln trusts on content Debian would never sign.

struct TestArchive {
    keyring: PathBuf,
    files: std::collections::BTreeMap<String, Vec<u8>>,
    _dir: tempfile::TempDir,
}

fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"!<arch>\n".to_vec();
    for (name, data) in members {
        let header = format!(
            "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            name,
            0,
            0,
            0,
            "100644",
            data.len()
        );
        out.extend(header.as_bytes());
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    out
}

fn tar_gz(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        builder.append_data(&mut h, name, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn make_deb(name: &str, version: &str, depends: &str, file: &str) -> Vec<u8> {
    let control = format!("Package: {name}\nVersion: {version}\nDepends: {depends}\n");
    ar(&[
        ("debian-binary", b"2.0\n"),
        (
            "control.tar.gz",
            &tar_gz(&[("./control", control.as_bytes(), 0o644)]),
        ),
        (
            "data.tar.gz",
            &tar_gz(&[(file, format!("{name} {version}").as_bytes(), 0o755)]),
        ),
    ])
}

/// A suite `kilntest` with `hello` (needing `libhello (>= 1.0) | libalt`) and `libhello`,
/// listing only `Packages.gz`, valid until `valid_until`.
fn test_archive(valid_until: &str) -> TestArchive {
    let debs = [
        (
            "hello",
            "2.0-1",
            "libhello (>= 1.0) | libalt",
            "./usr/bin/hello",
        ),
        ("libhello", "1.2-1", "", "./usr/lib/libhello.so.1"),
    ]
    .map(|(name, version, depends, file)| {
        let deb = make_deb(name, version, depends, file);
        let fields = format!("Depends: {depends}\n");
        (name.to_string(), version.to_string(), fields, deb)
    });
    signed_archive(valid_until, &debs)
}

/// A suite `kilntest` signed with a key made here, holding `debs`: (name, version, more index
/// fields, the .deb's bytes).
fn signed_archive(valid_until: &str, debs: &[(String, String, String, Vec<u8>)]) -> TestArchive {
    use pgp::composed::{ArmorOptions, CleartextSignedMessage, KeyType, SecretKeyParamsBuilder};
    use pgp::ser::Serialize;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let key = SecretKeyParamsBuilder::default()
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .primary_user_id("kiln test archive".into())
        .build()
        .unwrap()
        .generate(&mut rng)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("test-archive.gpg");
    std::fs::write(&keyring, key.to_public_key().to_bytes().unwrap()).unwrap();

    let mut files = std::collections::BTreeMap::new();
    let mut packages = String::new();
    for (name, version, fields, deb) in debs {
        let filename = format!("pool/main/{name}_{version}_amd64.deb");
        packages += &format!(
            "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{fields}\
             Filename: {filename}\nSize: {}\nSHA256: {}\n\n",
            deb.len(),
            sha256_bytes(deb)
        );
        files.insert(format!("/debian/{filename}"), deb.clone());
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(packages.as_bytes()).unwrap();
    let packages_gz = gz.finish().unwrap();
    let release = format!(
        "Origin: kiln\nSuite: testing\nCodename: kilntest\nDate: Thu, 01 Jan 2026 00:00:00 UTC\n\
         Valid-Until: {valid_until}\nArchitectures: amd64\nComponents: main\nSHA256:\n \
         {} {} main/binary-amd64/Packages.gz\n",
        sha256_bytes(&packages_gz),
        packages_gz.len()
    );
    let signed =
        CleartextSignedMessage::sign(&mut rng, &release, &key.primary_key, &"".into()).unwrap();
    let inrelease = signed
        .to_armored_string(ArmorOptions::default())
        .unwrap()
        .into_bytes();
    files.insert("/debian/dists/kilntest/InRelease".into(), inrelease);
    files.insert(
        "/debian/dists/kilntest/main/binary-amd64/Packages.gz".into(),
        packages_gz,
    );
    TestArchive {
        keyring,
        files,
        _dir: dir,
    }
}

fn serve_files(files: std::collections::BTreeMap<String, Vec<u8>>) -> String {
    serve(Arc::new(move |path: &str, _range, _n| {
        match files.get(path) {
            Some(body) => Reply::Body(body.clone()),
            None => Reply::NotFound,
        }
    }))
    .0
}

fn test_options(home: &Path, mirror: &str, test: &TestArchive) -> ArchiveOptions {
    let mut opts = ArchiveOptions::new(home);
    opts.mirror = mirror.to_string();
    opts.suite = "kilntest".into();
    opts.keyring = Some(test.keyring.clone());
    opts
}

#[test]
fn self_signed_archive_end_to_end() {
    let test = test_archive("Fri, 01 Jan 2100 00:00:00 UTC");
    let mirror = serve_files(test.files.clone());
    let home = tempfile::tempdir().unwrap();
    let archive = Archive::open(test_options(home.path(), &mirror, &test)).unwrap();
    assert_eq!(archive.index().unwrap().len(), 2);
    let pkgs = archive.resolve(&["hello"], Deps::All).unwrap();
    let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["hello", "libhello"]);
    let mut tree = Tree::new();
    for pkg in &pkgs {
        let path = archive.fetch(pkg).unwrap();
        deb::read_into_tree(&path, &pkg.deb_limits(), &mut tree, archive.store()).unwrap();
    }
    let hello = tree.get(&TreePath::new("usr/bin/hello").unwrap()).unwrap();
    assert_eq!(hello.mode, 0o755);
    let EntryKind::File(content) = &hello.kind else {
        panic!("not a file");
    };
    assert_eq!(kiln::tree::read_content(content).unwrap(), b"hello 2.0-1");
    assert!(
        tree.get(&TreePath::new("usr/lib/libhello.so.1").unwrap())
            .is_some()
    );
    // InRelease + Packages.gz + two .debs.
    assert_eq!(archive.network_requests(), 4);

    // Warm: nothing asked (the index was stored compressed, as only Packages.gz was listed).
    let again = Archive::open(test_options(home.path(), &mirror, &test)).unwrap();
    for pkg in again.resolve(&["hello"], Deps::All).unwrap() {
        again.fetch(&pkg).unwrap();
    }
    assert_eq!(again.network_requests(), 0);
    assert_eq!(again.release_digest(), archive.release_digest());

    // The built-in Debian keyring does not trust this archive.
    let mut opts = test_options(tempfile::tempdir().unwrap().path(), &mirror, &test);
    opts.keyring = None;
    let err = Archive::open(opts)
        .err()
        .expect("untrusted archive accepted");
    assert!(matches!(err, PackagesError::BadSignature { .. }), "{err}");
}

#[test]
fn expired_release_is_refused() {
    let test = test_archive("Fri, 02 Jan 2026 00:00:00 UTC");
    let mirror = serve_files(test.files.clone());
    let home = tempfile::tempdir().unwrap();
    let err = Archive::open(test_options(home.path(), &mirror, &test))
        .err()
        .expect("expired InRelease accepted");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, PackagesError::Expired { .. }), "{msg}");
    assert!(msg.contains("2026-01-02 00:00:00 UTC"), "{msg}");
    assert!(files_under(home.path()).is_empty());
}

#[test]
fn release_for_another_suite_is_refused() {
    let test = test_archive("Fri, 01 Jan 2100 00:00:00 UTC");
    let mut files = test.files.clone();
    // A mirror answering `stable` with the (validly signed) kilntest file.
    let inrelease = files["/debian/dists/kilntest/InRelease"].clone();
    files.insert("/debian/dists/stable/InRelease".into(), inrelease);
    let mirror = serve_files(files);
    let home = tempfile::tempdir().unwrap();
    let mut opts = test_options(home.path(), &mirror, &test);
    opts.suite = "stable".into();
    let err = Archive::open(opts).err().expect("wrong suite accepted");
    let msg = err.to_string();
    assert!(matches!(err, PackagesError::BadRelease { .. }), "{msg}");
    assert!(
        msg.contains("signed for suite testing (kilntest), not stable"),
        "{msg}"
    );
    assert!(files_under(home.path()).is_empty());
}

#[test]
fn server_errors_are_retried_then_succeed() {
    let test = test_archive("Fri, 01 Jan 2100 00:00:00 UTC");
    let files = test.files.clone();
    // Every path answers 503 on its first request, then the file.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let (mirror, requests) = serve(Arc::new(move |path: &str, _range, _n| {
        if seen.lock().unwrap().insert(path.to_string()) {
            return Reply::Status(503);
        }
        match files.get(path) {
            Some(body) => Reply::Body(body.clone()),
            None => Reply::NotFound,
        }
    }));
    let home = tempfile::tempdir().unwrap();
    let mut opts = test_options(home.path(), &mirror, &test);
    opts.fetch.first_backoff = Duration::from_millis(10);
    let archive = Archive::open(opts).unwrap();
    let pkg = archive.resolve(&["libhello"], Deps::None).unwrap();
    archive.fetch(&pkg[0]).unwrap();
    // InRelease, Packages.gz and the .deb: each failed once, then worked.
    assert_eq!(requests.load(Ordering::SeqCst), 6);
    assert_eq!(archive.network_requests(), 6);
}

#[test]
fn stalled_server_times_out() {
    let (mirror, _) = serve(Arc::new(|_: &str, _range, _n| {
        Reply::Stall(Duration::from_secs(5))
    }));
    let home = tempfile::tempdir().unwrap();
    let mut opts = ArchiveOptions::new(home.path());
    opts.mirror = mirror;
    opts.fetch.read_timeout = Duration::from_millis(500);
    opts.fetch.tries = 2;
    let started = Instant::now();
    let err = Archive::open(opts).err().expect("stalled server accepted");
    let msg = err.to_string();
    assert!(
        matches!(err, PackagesError::Unreachable { tries: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("stalled: the mirror sent nothing for 0.5 s"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// A .deb made by `dpkg-deb` (the reference tool) whose data is `size` bytes of zeros, compressed
/// with `compressor` (xz, zstd, gzip), that declares `Installed-Size: 10` (KiB).
fn zero_bomb(dir: &Path, name: &str, compressor: &str, size: u64) -> Vec<u8> {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/bomb")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: kiln <k@example.org>\n\
             Installed-Size: 10\nDescription: zeros\n"
        ),
    )
    .unwrap();
    // Sparse: the test's own disk holds none of it.
    std::fs::File::create(root.join("usr/share/bomb/zeros"))
        .unwrap()
        .set_len(size)
        .unwrap();
    let out = dir.join(format!("{name}.deb"));
    let status = std::process::Command::new("dpkg-deb")
        .args([
            "--root-owner-group",
            "-z1",
            &format!("-Z{compressor}"),
            "--build",
        ])
        .arg(&root)
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("dpkg-deb (Debian package dpkg) is installed");
    assert!(status.success(), "dpkg-deb --build failed");
    std::fs::read(&out).unwrap()
}

#[test]
fn decompression_bombs_are_refused_naming_the_package() {
    const BOMB: u64 = 100 << 20;
    let work = tempfile::tempdir().unwrap();
    let debs: Vec<(String, String, String, Vec<u8>)> = ["xz", "zstd", "gzip"]
        .iter()
        .map(|z| {
            let name = format!("bomb-{z}");
            let deb = zero_bomb(work.path(), &name, z, BOMB);
            eprintln!(
                "{name}: {} bytes of .deb for {BOMB} bytes of data",
                deb.len()
            );
            (name, "1.0".into(), "Installed-Size: 10\n".into(), deb)
        })
        .collect();
    let test = signed_archive("Fri, 01 Jan 2100 00:00:00 UTC", &debs);
    let mirror = serve_files(test.files.clone());
    let home = tempfile::tempdir().unwrap();
    let archive = Archive::open(test_options(home.path(), &mirror, &test)).unwrap();
    for (name, ..) in &debs {
        let pkg = &archive.resolve(&[name.as_str()], Deps::None).unwrap()[0];
        assert_eq!(pkg.installed_size, Some(10));
        let limits = pkg.deb_limits();
        assert!(limits.data_bytes < BOMB / 4, "{limits:?}");
        // The download is what the signed index lists: it verifies and is cached.
        let path = archive.fetch(pkg).unwrap();
        let mut tree = Tree::new();
        let started = Instant::now();
        let err = deb::read_into_tree(&path, &limits, &mut tree, archive.store()).unwrap_err();
        let msg = err.to_string();
        eprintln!("{name}: refused in {:.2?}: {msg}", started.elapsed());
        assert!(matches!(err, deb::DebError::TooLarge { .. }), "{msg}");
        for want in [
            format!("package {name} 1.0"),
            format!("more than {} bytes", limits.data_bytes),
            "Installed-Size 10 KiB".to_string(),
            "decompression bomb".to_string(),
        ] {
            assert!(msg.contains(&want), "{want:?} not in {msg}");
        }
        // Nothing of it is in the tree, and nothing near its size reached the store: no
        // half-written temporary file, no blob past the limit.
        assert_eq!(tree, Tree::new());
        for f in files_under(home.path()) {
            let len = std::fs::metadata(&f).unwrap().len();
            assert!(len <= limits.data_bytes, "{} is {len} bytes", f.display());
            let file_name = f.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                !file_name.starts_with(".kiln-tmp-"),
                "left behind: {}",
                f.display()
            );
        }
    }
}

#[test]
fn trickling_mirror_hits_the_stall_timeout() {
    let test = test_archive("Fri, 01 Jan 2100 00:00:00 UTC");
    let files = test.files.clone();
    // The .deb: headers and half the body at once, then a byte every 3 s.
    let (mirror, _) = serve(Arc::new(move |path: &str, _range, _n| {
        match files.get(path) {
            Some(body) if path.ends_with(".deb") => {
                Reply::Trickle(body.clone(), body.len() / 2, Duration::from_secs(3))
            }
            Some(body) => Reply::Body(body.clone()),
            None => Reply::NotFound,
        }
    }));
    let home = tempfile::tempdir().unwrap();
    let mut opts = test_options(home.path(), &mirror, &test);
    opts.fetch.read_timeout = Duration::from_secs(2);
    opts.fetch.tries = 1;
    let archive = Archive::open(opts).unwrap();
    let pkg = &archive.resolve(&["libhello"], Deps::None).unwrap()[0];
    let started = Instant::now();
    let err = archive.fetch(pkg).unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    eprintln!("after {took:.2?}: {msg}");
    assert!(matches!(err, PackagesError::Unreachable { .. }), "{msg}");
    assert!(
        msg.contains("stalled: the mirror sent nothing for 2.0 s"),
        "{msg}"
    );
    assert!(msg.contains("KILN_STALL_TIMEOUT"), "{msg}");
    // One stall timeout (plus the first byte's 3 s would be more): far from the ~1 byte / 3 s
    // the server would keep up for minutes.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!archive.store().contains(&pkg.sha256));
}

#[test]
fn mirror_sending_more_than_listed_is_refused() {
    let test = test_archive("Fri, 01 Jan 2100 00:00:00 UTC");
    let files = test.files.clone();
    // The .deb followed by 4 MiB that the signed index does not list.
    let (mirror, _) = serve(Arc::new(move |path: &str, _range, _n| {
        match files.get(path) {
            Some(body) if path.ends_with(".deb") => {
                let mut more = body.clone();
                more.resize(body.len() + (4 << 20), 0);
                Reply::Body(more)
            }
            Some(body) => Reply::Body(body.clone()),
            None => Reply::NotFound,
        }
    }));
    let home = tempfile::tempdir().unwrap();
    let archive = Archive::open(test_options(home.path(), &mirror, &test)).unwrap();
    let pkg = &archive.resolve(&["libhello"], Deps::None).unwrap()[0];
    let err = archive.fetch(pkg).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, PackagesError::TooLarge { .. }), "{msg}");
    assert!(msg.contains("package libhello 1.2-1"), "{msg}");
    assert!(
        msg.contains(&format!(
            "more than {} bytes (the size the signed index lists)",
            pkg.size
        )),
        "{msg}"
    );
    // Nothing cached, no partial file kept, nothing past the listed size written.
    assert!(!archive.store().contains(&pkg.sha256));
    let partials: Vec<PathBuf> = files_under(home.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
}

#[test]
fn mirror_credentials_never_reach_messages_or_file_names() {
    let test = test_archive("Fri, 01 Jan 2100 00:00:00 UTC");
    let mirror = serve_files(test.files.clone());
    let with_secret = mirror.replace("http://", "http://kiln:s3cr3t@");
    let home = tempfile::tempdir().unwrap();
    // Works (the server ignores the credentials), and nothing on disk is named after them.
    let archive = Archive::open(test_options(home.path(), &with_secret, &test)).unwrap();
    assert_eq!(archive.index().unwrap().len(), 2);
    for f in files_under(home.path()) {
        assert!(!f.to_string_lossy().contains("s3cr3t"), "{}", f.display());
    }
    // An error names the mirror without them.
    let mut opts = test_options(home.path(), &with_secret, &test);
    opts.suite = "nosuch".into();
    let err = Archive::open(opts).err().expect("unknown suite accepted");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("http://***@127.0.0.1:"), "{msg}");
    assert!(!msg.contains("s3cr3t"), "{msg}");
    assert!(!format!("{err:?}").contains("s3cr3t"), "{err:?}");
}
