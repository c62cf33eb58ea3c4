//! Disk image outputs checked by qemu-img: a write pattern like a filesystem builder's (sequential
//! blocks, zero runs, rewrites, scattered and unaligned writes, the very end of the disk) goes to a
//! raw image and to qcow2 images in several cluster sizes, with and without compression; the raw
//! file must equal an in-memory model, every qcow2 must pass `qemu-img check` and compare identical
//! to the raw file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kiln::disk::WriteAt;
use kiln::disk::image::{ImageError, ImageFormat, ImageOptions, ImageReport, ImageWriter};

mod common;
use common::sha256;

const MIB: u64 = 1 << 20;

/// xorshift64*: deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Incompressible bytes.
    fn noise(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 32) as u8).collect()
    }

    /// Compressible, never-zero bytes (text lines).
    fn text(&mut self, n: usize) -> Vec<u8> {
        let seed = self.below(1000);
        let mut out = Vec::with_capacity(n + 64);
        let mut i = 0;
        while out.len() < n {
            out.extend_from_slice(format!("line {seed}-{i}: kiln writes disks\n").as_bytes());
            i += 1;
        }
        out.truncate(n);
        out
    }
}

/// Disk size for the pattern: not a multiple of any cluster size, so the last cluster is short.
const PATTERN_SIZE: u64 = 64 * MIB + 1536;

/// The write sequence, in order.
fn pattern() -> Vec<(u64, Vec<u8>)> {
    let size = PATTERN_SIZE;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut w: Vec<(u64, Vec<u8>)> = Vec::new();
    // A GPT-like start: header and entries.
    w.push((512, rng.noise(512)));
    w.push((1024, rng.text(16 * 1024)));
    // A filesystem written block by block; blocks 100..150 are zeros (a zero run inside data).
    for i in 0..768u64 {
        let block = if (100..150).contains(&i) {
            vec![0u8; 4096]
        } else if i % 3 == 0 {
            rng.noise(4096)
        } else {
            rng.text(4096)
        };
        w.push((MIB + i * 4096, block));
    }
    // One big unaligned write crossing many cluster boundaries.
    let mut big = rng.text(MIB as usize);
    big.extend(rng.noise(MIB as usize));
    w.push((8 * MIB + 12345, big));
    // A large run of zeros that should never allocate anything.
    w.push((20 * MIB, vec![0u8; MIB as usize]));
    // Scattered writes of odd sizes at odd offsets.
    for k in 0..30 {
        let len = 1 + rng.below(70_000) as usize;
        let at = rng.below(size - len as u64);
        let data = if k % 2 == 0 {
            rng.text(len)
        } else {
            rng.noise(len)
        };
        w.push((at, data));
    }
    // Many small writes into distinct clusters (more than the writer keeps in memory), then a
    // second pass into the same clusters after they have been stored.
    for pass in 0..2u64 {
        for i in 0..100u64 {
            let at = 30 * MIB + i * 65536 + 13 + pass * 5000;
            w.push((at, rng.text(7 + pass as usize * 300)));
        }
    }
    // Rewrites of data written earlier: inside the block-written region, zeros over data across a
    // cluster boundary, and into the compressible half of the big write.
    w.push((MIB + 8192, rng.noise(4096)));
    w.push((MIB + 65536 - 100, vec![0u8; 10 * 1024]));
    w.push((8 * MIB + 300_000, rng.noise(1000)));
    // A partially written cluster that nothing else touches.
    w.push((40 * MIB + 7, rng.text(100)));
    // The very end of the disk: crossing into the short last cluster, and its last byte.
    w.push((size - 8192, rng.noise(8192)));
    w.push((size - 1, vec![0xa5]));
    // A GPT backup header at the end, then the primary header rewritten.
    w.push((size - 512, rng.noise(512)));
    w.push((512, rng.noise(512)));
    w
}

fn model(size: u64, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    for (at, data) in writes {
        disk[*at as usize..*at as usize + data.len()].copy_from_slice(data);
    }
    disk
}

fn write_image(
    path: &Path,
    size: u64,
    opts: &ImageOptions,
    writes: &[(u64, Vec<u8>)],
) -> ImageReport {
    let mut w = ImageWriter::create(path, size, opts).unwrap();
    for (at, data) in writes {
        w.write_at(*at, data).unwrap();
    }
    w.finish().unwrap()
}

fn qcow2(cluster_size: u32, compress: bool) -> ImageOptions {
    ImageOptions {
        format: ImageFormat::Qcow2,
        compress,
        cluster_size,
    }
}

/// `cmd` run to its end: whether it succeeded, and its stdout followed by its stderr.
fn tool(cmd: &mut Command) -> (bool, String) {
    let out = common::output(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-img check` must find no errors and no leaks (exit status 0).
fn assert_check_clean(path: &Path) {
    let (ok, text) = tool(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(path),
    );
    assert!(ok, "qemu-img check {}:\n{text}", path.display());
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
}

fn assert_identical(raw: &Path, qcow2: &Path) {
    let (ok, text) = tool(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(raw)
            .arg(qcow2),
    );
    assert!(
        ok,
        "qemu-img compare {} {}:\n{text}",
        raw.display(),
        qcow2.display()
    );
    assert!(text.contains("Images are identical"), "{text}");
}

fn info(path: &Path) -> serde_json::Value {
    let (ok, text) = tool(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(path),
    );
    assert!(ok, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn pattern_reads_back_identically_from_raw_and_every_qcow2_variant() {
    let dir = tempfile::tempdir().unwrap();
    let writes = pattern();
    let expected = model(PATTERN_SIZE, &writes);

    let raw = dir.path().join("disk.raw");
    let report = write_image(&raw, PATTERN_SIZE, &ImageOptions::default(), &writes);
    assert_eq!(report.format, ImageFormat::Raw);
    assert_eq!(report.file_size, PATTERN_SIZE);
    assert!(
        std::fs::read(&raw).unwrap() == expected,
        "raw image differs from the model"
    );
    let raw_info = info(&raw);
    assert_eq!(raw_info["format"], "raw");
    assert_eq!(raw_info["virtual-size"], PATTERN_SIZE);

    let mut sizes = std::collections::BTreeMap::new();
    for (cluster_size, compress) in [
        (65536, false),
        (65536, true),
        (4096, false),
        (4096, true),
        (512, true),
        (2 << 20, true),
    ] {
        let path = dir
            .path()
            .join(format!("disk-{cluster_size}-{compress}.qcow2"));
        let report = write_image(&path, PATTERN_SIZE, &qcow2(cluster_size, compress), &writes);
        let label = format!("{cluster_size}/{compress}");
        assert_eq!(report.format, ImageFormat::Qcow2);
        assert_eq!(report.virtual_size, PATTERN_SIZE);
        assert_eq!(report.file_size, std::fs::metadata(&path).unwrap().len());
        assert_eq!(report.file_size % cluster_size as u64, 0, "{label}");
        assert!(
            report.data_clusters + report.compressed_clusters > 0,
            "{label}"
        );
        if compress {
            assert!(
                report.compressed_clusters > 0,
                "{label}: nothing compressed"
            );
        } else {
            assert_eq!(report.compressed_clusters, 0, "{label}");
        }
        // Far less than the disk: about 5.4 MiB of data in some 250 distinct 64 KiB areas.
        if cluster_size <= 65536 {
            assert!(report.file_size < 24 * MIB, "{label}: {report:?}");
        }
        eprintln!("{label}: {report:?}");

        assert_check_clean(&path);
        assert_identical(&raw, &path);
        let i = info(&path);
        assert_eq!(i["format"], "qcow2", "{label}");
        assert_eq!(i["virtual-size"], PATTERN_SIZE, "{label}");
        assert_eq!(i["cluster-size"], cluster_size, "{label}");
        assert_eq!(i["format-specific"]["data"]["compat"], "1.1", "{label}");
        sizes.insert((cluster_size, compress), report.file_size);
    }
    // Compression pays for the text half of the data.
    assert!(
        sizes[&(65536, true)] < sizes[&(65536, false)] * 9 / 10,
        "{sizes:?}"
    );
    assert!(
        sizes[&(4096, true)] < sizes[&(4096, false)] * 9 / 10,
        "{sizes:?}"
    );

    // An independent read-back: qemu converts the compressed qcow2 to raw, which must be the model.
    let back = dir.path().join("back.raw");
    let (ok, text) = tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(dir.path().join("disk-65536-true.qcow2"))
            .arg(&back),
    );
    assert!(ok, "{text}");
    assert!(
        std::fs::read(&back).unwrap() == expected,
        "qemu's read-back differs"
    );
}

#[test]
fn raw_image_is_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let report = write_image(&path, PATTERN_SIZE, &ImageOptions::default(), &pattern());
    let meta = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), PATTERN_SIZE);
    assert_eq!(report.allocated_bytes, meta.blocks() * 512);
    // About 5.4 MiB of non-zero data in a 64 MiB disk.
    assert!(
        meta.blocks() * 512 < 8 * MIB,
        "raw image allocates {} bytes",
        meta.blocks() * 512
    );
}

#[test]
fn ten_gib_disk_with_little_data_is_a_tiny_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 << 30;
    let mut rng = Rng(7);
    let writes = vec![
        (0, rng.noise(512)),
        (MIB, rng.text(200_000)),
        (5 << 30, rng.noise(70_000)),
        (size - 16384, rng.noise(16384)),
    ];
    let path = dir.path().join("big.qcow2");
    let report = write_image(&path, size, &ImageOptions::qcow2(false), &writes);
    assert!(report.file_size < MIB, "{report:?}");
    assert_check_clean(&path);
    let i = info(&path);
    assert_eq!(i["virtual-size"], size);
    assert_eq!(i["format"], "qcow2");

    let raw = dir.path().join("big.raw");
    write_image(&raw, size, &ImageOptions::default(), &writes);
    assert_identical(&raw, &path);
}

#[test]
fn images_with_nothing_written_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    for size in [0, 512, MIB, 3 << 30] {
        let path = dir.path().join(format!("empty-{size}.qcow2"));
        let report = write_image(&path, size, &ImageOptions::qcow2(true), &[]);
        assert_eq!(report.data_clusters + report.compressed_clusters, 0);
        assert_check_clean(&path);
        assert_eq!(info(&path)["virtual-size"], size);
        let raw = dir.path().join(format!("empty-{size}.raw"));
        let report = write_image(&raw, size, &ImageOptions::default(), &[]);
        assert_eq!(report.allocated_bytes, 0);
        assert_identical(&raw, &path);
    }
}

#[test]
fn same_writes_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let writes = pattern();
    for (name, opts) in [
        ("raw", ImageOptions::default()),
        ("plain.qcow2", ImageOptions::qcow2(false)),
        ("packed.qcow2", ImageOptions::qcow2(true)),
    ] {
        let a = dir.path().join(format!("a-{name}"));
        let b = dir.path().join(format!("b-{name}"));
        write_image(&a, PATTERN_SIZE, &opts, &writes);
        write_image(&b, PATTERN_SIZE, &opts, &writes);
        assert_eq!(sha256(&a), sha256(&b), "{name}");
    }
}

#[test]
fn dropping_without_finish_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [ImageOptions::default(), ImageOptions::qcow2(true)] {
        let path = dir.path().join("disk.img");
        let mut w = ImageWriter::create(&path, 16 * MIB, &opts).unwrap();
        w.write_at(4096, &Rng(3).noise(300_000)).unwrap();
        // The temp file exists while writing, next to the final path and hidden.
        let during = dir_entries(dir.path());
        assert_eq!(during.len(), 1, "{during:?}");
        let name = during[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with(".disk.img.") && name.ends_with(".tmp"),
            "{name}"
        );
        drop(w);
        assert!(!path.exists());
        assert_eq!(dir_entries(dir.path()), Vec::<PathBuf>::new());
    }
}

#[test]
fn an_error_midway_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [ImageOptions::default(), ImageOptions::qcow2(false)] {
        let path = dir.path().join("disk.img");
        let mut w = ImageWriter::create(&path, 16 * MIB, &opts).unwrap();
        w.write_at(0, &Rng(5).noise(100_000)).unwrap();
        // Past the end of the disk: refused, and the writer stays failed.
        let err = w.write_at(16 * MIB - 10, &[1u8; 20]).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert!(w.write_at(0, b"more").is_err());
        match w.finish() {
            Err(ImageError::Failed { cause, .. }) => assert!(cause.contains("past the end")),
            other => panic!("finish after an error gave {other:?}"),
        }
        assert!(!path.exists());
        assert_eq!(dir_entries(dir.path()), Vec::<PathBuf>::new());
    }
}

#[test]
fn bad_options_are_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    for (size, cluster_size) in [(MIB, 1000), (MIB, 256), (MIB, 4 << 20), (MIB + 100, 65536)] {
        let err = ImageWriter::create(&path, size, &qcow2(cluster_size, false))
            .err()
            .unwrap();
        assert!(matches!(err, ImageError::Options { .. }), "{err}");
    }
    assert_eq!(dir_entries(dir.path()), Vec::<PathBuf>::new());
}

/// Writes 200 MiB (half text, half noise, 1 MiB writes) through the qcow2 writer and compares
/// with `qemu-img convert -O qcow2` of a raw file with the same content; median of 5 each
/// (timings include an fsync of the output on both sides).
/// Run: `cargo test --release --test image -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_qcow2_writer_vs_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let mut rng = Rng(11);
    let chunks: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            if i % 2 == 0 {
                rng.text(MIB as usize)
            } else {
                rng.noise(MIB as usize)
            }
        })
        .collect();
    let raw = dir.path().join("src.raw");
    {
        let mut w = ImageWriter::create(&raw, size, &ImageOptions::default()).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            w.write_at(i as u64 * MIB, c).unwrap();
        }
        w.finish().unwrap();
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    for compress in [false, true] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let (mut ours_cpu, mut theirs_cpu) = (Vec::new(), Vec::new());
        for round in 0..5 {
            let out = dir.path().join(format!("ours-{compress}-{round}.qcow2"));
            let (t, cpu) = (Instant::now(), cpu_seconds(libc::RUSAGE_THREAD));
            let mut w = ImageWriter::create(&out, size, &ImageOptions::qcow2(compress)).unwrap();
            for (i, c) in chunks.iter().enumerate() {
                w.write_at(i as u64 * MIB, c).unwrap();
            }
            w.finish().unwrap();
            ours.push(t.elapsed().as_secs_f64());
            ours_cpu.push(cpu_seconds(libc::RUSAGE_THREAD) - cpu);

            let out2 = dir.path().join(format!("qemu-{compress}-{round}.qcow2"));
            let mut cmd = Command::new("qemu-img");
            cmd.args(["convert", "-f", "raw", "-O", "qcow2"]);
            if compress {
                cmd.arg("-c");
            }
            let (t, cpu) = (Instant::now(), cpu_seconds(libc::RUSAGE_CHILDREN));
            let (ok, text) = tool(cmd.arg(&raw).arg(&out2));
            theirs_cpu.push(cpu_seconds(libc::RUSAGE_CHILDREN) - cpu);
            // qemu-img convert does not fsync by default; ours does, so time a sync too.
            let synced = std::fs::File::open(&out2).unwrap().sync_all();
            theirs.push(t.elapsed().as_secs_f64());
            assert!(ok && synced.is_ok(), "{text}");
            assert_identical(&raw, &out);
            if round == 0 {
                println!(
                    "compress={compress}: file size kiln {} bytes, qemu-img {} bytes",
                    std::fs::metadata(&out).unwrap().len(),
                    std::fs::metadata(&out2).unwrap().len()
                );
            }
            std::fs::remove_file(&out).unwrap();
            std::fs::remove_file(&out2).unwrap();
        }
        // The same data written 4 KiB at a time, as a filesystem builder might.
        let mut small = Vec::new();
        for round in 0..3 {
            let out = dir.path().join(format!("small-{compress}-{round}.qcow2"));
            let t = Instant::now();
            let mut w = ImageWriter::create(&out, size, &ImageOptions::qcow2(compress)).unwrap();
            for (i, c) in chunks.iter().enumerate() {
                for (j, block) in c.chunks(4096).enumerate() {
                    w.write_at(i as u64 * MIB + j as u64 * 4096, block).unwrap();
                }
            }
            w.finish().unwrap();
            small.push(t.elapsed().as_secs_f64());
            std::fs::remove_file(&out).unwrap();
        }
        println!(
            "compress={compress}: kiln samples {ours:.3?}, kiln 4 KiB-write samples {small:.3?}, \
             qemu-img samples {theirs:.3?}; CPU s kiln {ours_cpu:.3?} qemu-img {theirs_cpu:.3?}"
        );
        let (a, b) = (median(ours), median(theirs));
        println!(
            "qcow2 compress={compress}: kiln {a:.3} s ({:.0} MiB/s), qemu-img convert {b:.3} s \
             ({:.0} MiB/s), ratio {:.2}",
            200.0 / a,
            200.0 / b,
            b / a
        );
        let (a, b) = (median(ours_cpu), median(theirs_cpu));
        println!(
            "qcow2 compress={compress}: CPU time (user+sys) kiln {a:.3} s, qemu-img {b:.3} s, \
             ratio {:.2}",
            b / a
        );
    }
}

/// User + system CPU seconds of this thread or of the reaped children.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(who, &mut ru) }, 0);
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}
