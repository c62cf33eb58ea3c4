//! The `kiln` command line: argument parsing (clap derive) and one function per subcommand.
//! Results go to stdout (`--json` for machines), logs to stderr through `tracing`.

use crate::net::redact;
use crate::recipe::{self, Diagnostic, LoadOptions};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Exit code for an operational failure: a download, a boot, the network, the disk.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for input errors the user can fix: a bad recipe, argument or file they named, or
/// input kiln refused.
pub const EXIT_RECIPE: i32 = 2;
/// Exit code when interrupted (SIGINT, SIGTERM): 128 + SIGINT, as shells report it.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build bootable OS disk images from recipes, prove they boot, and ship them",
    long_about = "kiln turns a recipe (YAML rendered with minijinja templates) into a partitioned, \
                  bootable raw or qcow2 disk image, boots it under QEMU to prove it works, and \
                  publishes it for the hosts that run it.",
    after_help = "Examples:\n  kiln render recipes/minimal.yaml --set hostname=demo\n  \
                  kiln check recipes/*.yaml\n  kiln completions bash > /etc/bash_completion.d/kiln"
)]
pub struct Cli {
    /// More log output on stderr (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a recipe fully rendered, merged and validated.
    #[command(after_help = "Examples:\n  kiln render recipes/minimal.yaml\n  \
                            kiln render recipes/minimal.yaml --set hostname=demo --json")]
    Render(RenderArgs),
    /// Validate recipes; exit 0 when all are valid, 2 when any is not.
    #[command(after_help = "Examples:\n  kiln check recipes/*.yaml\n  \
                            kiln check --json recipes/minimal.yaml")]
    Check(CheckArgs),
    /// Build a recipe's disk image and boot it under QEMU to prove it works.
    #[command(after_help = "Examples:\n  kiln build recipes/minimal.yaml\n  \
                            kiln build recipes/minimal.yaml --set hostname=demo -o out/ --profile direct\n  \
                            kiln build recipes/minimal.yaml --no-verify --json\n  \
                            kiln build recipes/minimal.yaml --nats nats://127.0.0.1:4222   # workers of `kiln up`\n  \
                            kiln build recipes/minimal.yaml --no-bus                       # no NATS at all\n\n\
                            Every stage is cached in $KILN_HOME (default ~/.cache/kiln) by its inputs: \
                            an unchanged rebuild makes no download and no boot. The image, its serial \
                            log and a JSON report are written to the output directory.\n\n\
                            Without --nats, kiln starts a private nats-server (Debian package \
                            `nats-server`; JetStream in a temp dir, a free loopback port), runs every \
                            stage worker in this process and stops the server when the build ends: \
                            the same stage workers and messages as `kiln up`. Progress: a bar per \
                            stage when stderr is a terminal, plain lines otherwise, JSON lines with \
                            --json, nothing with -q.")]
    Build(BuildArgs),
    /// Boot a disk image under QEMU and wait for a line on its serial console.
    #[command(
        after_help = "Examples:\n  kiln boot out/minimal-1.0.0.qcow2 --profile uefi --expect kiln-boot-ok\n  \
                            kiln boot disk.raw --profile direct --kernel vmlinuz --initrd initrd.img \\\n      \
                            --cmdline 'root=PARTUUID=…' --expect 'login:'\n\n\
                            Profiles are files in qemu/ (or --profiles DIR). The disk is attached with \
                            snapshot=on, so booting never changes it. KVM is used when a probe shows it \
                            runs guests, else TCG."
    )]
    Boot(BootArgs),
    /// Write a signing key (FILE, PKCS#8 PEM, mode 0600) and its public key (FILE.pub); with
    /// --secure-boot, a UEFI Secure Boot key (RSA 2048) and its certificate (FILE.crt).
    #[command(
        after_help = "Examples:\n  kiln keygen -o keys/images.key                  # ECDSA P-256: keys/images.key and keys/images.key.pub\n  \
                      kiln keygen -o keys/images.key --type ed25519\n  \
                      kiln keygen --secure-boot -o keys/secureboot.key # keys/secureboot.key and keys/secureboot.key.crt\n\n\
                      FILE.pub is what `kiln pull --trust`, `kiln agent --trust`, `cosign verify --key` and a \
                      containers-policy.json sigstoreSigned entry (keyPath) take. A Secure Boot key is what \
                      `kiln up/worker --secure-boot-key` sign boot loaders and unified kernel images with \
                      (default $KILN_HOME/secureboot.key, made on first use); its certificate is what firmware \
                      enrolls as db (and, in kiln's images, PK and KEK) and what `sbverify --cert` checks."
    )]
    Keygen {
        /// Where the secret key goes; the public key goes to FILE.pub (FILE.crt with
        /// --secure-boot).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Key type: ecdsa-p256 (cosign's default) or ed25519.
        #[arg(long = "type", value_enum, default_value_t = crate::store::KeyType::EcdsaP256)]
        key_type: crate::store::KeyType,
        /// A UEFI Secure Boot key and self-signed certificate instead of an image signing key.
        #[arg(long, conflicts_with = "key_type")]
        secure_boot: bool,
        /// The certificate's common name (with --secure-boot).
        #[arg(
            long,
            value_name = "NAME",
            requires = "secure_boot",
            default_value = "kiln Secure Boot key"
        )]
        name: String,
    },
    /// Sign an image already in a registry or layout, in cosign's format: to add a key, or to
    /// replace a signature in kiln's old format.
    #[command(
        after_help = "Example:\n  kiln sign localhost:5000/images/minimal:1.0.0 --key keys/images.key\n\n\
                      The manifest is fetched and its digest checked, then signed; signatures already there \
                      (other keys) are kept. Check with `kiln pull --trust KEY.pub` or `cosign verify --key KEY.pub`."
    )]
    Sign(SignArgs),
    /// Move a channel (a tag such as dev, canary, stable) to an image that verifies, and announce
    /// it to the agents that follow the channel.
    #[command(
        after_help = "Example:\n  kiln promote 127.0.0.1:5000/kiln/app@sha256:3b6b… --channel stable \\\n      \
                      --trust images.key.pub --trust-verifier verifier.key.pub --nats nats://127.0.0.1:4222\n\n\
                      The image must be given by digest. Its signature (by --trust) and a passing boot \
                      attestation (by a --trust-verifier key) are checked first, as `kiln verify` does; an image \
                      that fails either is refused and nothing moves. Then the same manifest is tagged CHANNEL \
                      in its repository and kiln.image.published.<repository> announces it with the channel as \
                      its tag and who promoted it: agents run with --watch REPO:CHANNEL deploy it."
    )]
    Promote(PromoteArgs),
    /// Pull an image back everywhere: agents running it return to the image before it, and
    /// pulls, promotions and agents refuse it from then on.
    #[command(
        after_help = "Example:\n  kiln revoke 127.0.0.1:5000/kiln/app@sha256:3b6b… --reason \"CVE-2026-1234 in openssl\" \\\n      \
                      --nats nats://127.0.0.1:4222\n\n\
                      The revocation is stored in the registry beside the image (the tag sha256-<hex>.revoked, \
                      with the reason; the image is its subject), where `kiln pull`, `kiln verify`, `kiln promote` \
                      and the agents look before they fetch anything, and announced on \
                      kiln.image.revoked.<repository>: every agent running the image deploys the image it ran \
                      before (checked again like any image) and reports kiln.deploy.<agent>.completed with the \
                      revocation as its cause. `kiln agents` marks hosts still on a revoked image. To undo it, \
                      delete the tag in the registry."
    )]
    Revoke(RevokeArgs),
    /// Check an image's signature, SBOM and provenance with a public key; exit 1 when a
    /// requirement fails.
    #[command(
        after_help = "Examples:\n  kiln verify localhost:5000/kiln/app:latest --key keys/images.key.pub\n  \
                      kiln verify localhost:5000/kiln/app@sha256:… --key keys/images.key.pub --require signature,sbom --json\n\n\
                      Everything is looked at and reported; --require (default: all three) says what must be \
                      verified for exit 0. The same attestations are what `cosign verify-attestation --key KEY.pub \
                      --type spdxjson|slsaprovenance1` checks."
    )]
    Verify(VerifyArgs),
    /// Print an image's SBOM (SPDX 2.3 JSON): a published image's from its attestation, checked
    /// with the key; a built image file's from beside it, checked against the file's digest.
    #[command(
        after_help = "Examples:\n  kiln sbom localhost:5000/kiln/app:latest --key keys/images.key.pub > app.spdx.json\n  \
                      kiln sbom out/app-1.0.raw"
    )]
    Sbom(SbomArgs),
    /// Push a disk image to an OCI registry (or an OCI layout directory), signed.
    #[command(
        after_help = "Examples:\n  kiln publish out/minimal-1.0.0.qcow2 --to localhost:5000/images/minimal:1.0.0 --key images.key\n  \
                            kiln publish disk.raw --to oci:/srv/images:latest\n\n\
                            The signature is cosign's: a simple signing payload in the manifest tagged \
                            sha256-<manifest hex>.sig, whose subject is the image (a referrer where the \
                            registry has the API); `cosign verify --key KEY.pub` checks it. Registry credentials: KILN_REGISTRY_USER and \
                            KILN_REGISTRY_PASSWORD."
    )]
    Publish(PublishArgs),
    /// Pull a disk image, checking digests and (with --trust) its signature; resumes an interrupted pull.
    #[command(
        after_help = "Example:\n  kiln pull localhost:5000/images/minimal:1.0.0 -o minimal.qcow2 --trust images.key.pub"
    )]
    Pull(PullArgs),
    /// List images in a registry, a repository or an OCI layout directory.
    #[command(
        after_help = "Examples:\n  kiln images localhost:5000\n  kiln images localhost:5000/images/minimal --json\n  kiln images oci:/srv/images"
    )]
    Images {
        /// `host:port`, `host:port/repository` or `oci:/dir`.
        target: String,
        /// Use plain http for a registry that is not on loopback.
        #[arg(long)]
        insecure: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write a partitioned disk image from directory trees (GPT, FAT32 ESP, ext4 root and data).
    #[command(
        after_help = "Examples:\n  kiln disk --root rootfs/ --esp esp/ -o disk.qcow2\n  \
                            kiln disk --root rootfs/ --data srv/:2G --size 8G --format raw -o disk.raw\n\n\
                            Owners, modes, xattrs and links come from the directories as they are; \
                            run as root (or from an unpacked tarball you own) for exact owners."
    )]
    Disk(DiskArgs),
    /// Run every build stage as NATS JetStream workers (all stages of `kiln worker`).
    #[command(
        after_help = "Examples:\n  kiln up --nats nats://nats.example.com:4222\n  \
                            KILN_NATS_URL=nats://127.0.0.1:4222 kiln up --listen 127.0.0.1:7070\n  \
                            kiln up --hook-repo https://git.example.com/platform/images.git --hook-recipes 'recipes/*.yaml'\n  \
                            kiln up --listen none\n  \
                            KILN_NATS_URL=nats://127.0.0.1:4222 kiln up --publish-to 127.0.0.1:5000 --key images.key\n  \
                            kiln up --ack-wait 5 --max-deliver 3    # take over a dead worker's message after 5 s\n\n\
                            The HTTP API (docs/api.md) listens on 127.0.0.1:7070 unless --listen says \
                            otherwise; every POST needs `Authorization: Bearer <token>`. The token comes \
                            from --token-file, else $KILN_API_TOKEN, else $KILN_HOME/api-token (generated \
                            on first start, mode 0600). `POST /v1/hooks/git` builds only repositories \
                            given with --hook-repo. At start, temp files that killed kiln processes left \
                            in $KILN_HOME are removed. Recipes with a publish: section are pushed to --publish-to (a \
                            registry host:port or oci:/dir), signed with --key, and announced on \
                            kiln.image.published.<repository>."
    )]
    Up(UpArgs),
    /// Run some build stages as NATS JetStream workers until SIGINT/SIGTERM.
    #[command(
        after_help = "Examples:\n  kiln worker --nats nats://127.0.0.1:4222 --stages rootfs,kernel,disk\n  \
                            kiln worker --stages verify\n  \
                            kiln worker --stages disk --ack-wait 5 --max-deliver 3\n  \
                            kiln worker --stages publish --publish-to registry.example:5000 --key images.key\n\n\
                            --ack-wait and --max-deliver set the stage consumers' redelivery when the workers \
                            create them; every worker of a stage should use the same values. \
                            At start, temp files that killed kiln processes left in $KILN_HOME are removed. \
                            Stages: source, render, rootfs, kernel, disk, verify, publish. \
                            Blobs travel through the kiln-blobs object store, stage records through the \
                            kiln-stages KV bucket."
    )]
    Worker(WorkerArgs),
    /// Submit a build request to NATS and print its build id.
    #[command(
        after_help = "Examples:\n  kiln submit recipes/minimal.yaml --follow\n  \
                            kiln submit web.yaml --git https://git.example.com/images.git --ref main --path recipes/web.yaml"
    )]
    Submit(SubmitArgs),
    /// Watch a git ref and submit a build for each recipe whose inputs a new commit changed.
    #[command(
        after_help = "Examples:\n  kiln watch --repo https://git.example.com/platform/images.git --ref main\n  \
                            kiln watch --repo /srv/git/images --ref main --recipes 'images/*.yaml' --interval 30 --json\n  \
                            kiln watch --repo /srv/git/images --ref main --baseline --once\n\n\
                            A recipe triggers when its build inputs (recipe, extends chain, templates, \
                            parameters) changed since the last commit seen; a README-only commit builds \
                            nothing. What was seen is kept in $KILN_HOME/watch/ (or --state FILE), so a \
                            restart does not rebuild everything. The first run builds every recipe, \
                            unless --baseline, which records the current commit as the starting point. \
                            Prints one line per submitted build: build id, recipe, commit."
    )]
    Watch(WatchArgs),
    /// Run the newest signed image of a repository:tag as a VM on this host (an application server).
    #[command(
        after_help = "Examples:\n  kiln agent --nats nats://nats.example.com:4222 --name hv-07 \\\n      \
                            --watch registry.example:5000/team/web:production --trust images.key.pub \\\n      \
                            --state-dir /var/lib/kiln-agent --listen 0.0.0.0:8080\n  \
                            kiln agent --name hv-01 --watch 127.0.0.1:5000/kiln/app:latest --trust k.pub --state-dir st --json\n\n\
                            On each kiln.image.published.<repository> message for the tag (and the last one \
                            already published, at start) the agent pulls the image by digest, checks its digests \
                            and its signature against --trust (refusing it otherwise), boots it under QEMU (UEFI, \
                            a qcow2 overlay on the pulled image, a QMP socket, the serial console in \
                            STATE-DIR/vm-N/serial.log, user networking forwarding a loopback port to the guest's \
                            health port), waits for health (the serial marker and/or an answer on the port), then \
                            stops the old VM through QMP and reports kiln.deploy.<name>.completed. If the new VM \
                            is not healthy in time it is killed, the old one keeps running, and \
                            kiln.deploy.<name>.failed says why. Health settings come from the image (the recipe's \
                            deploy: section) unless overridden here. VMs outlive the agent: a restarted agent \
                            re-adopts the VM in STATE-DIR/state.json (QEMU alive and answering QMP) or boots its \
                            image again. --listen is a stable address forwarded to the running VM, switched at \
                            the swap. With --json every result is a JSON line on stdout. Every --heartbeat-interval \
                            the agent records its state, groups (--group) and running image in the kiln-agents \
                            bucket, which `kiln agents` lists."
    )]
    Agent(AgentArgs),
    /// List the fleet: every agent's state, groups and running image, from its heartbeats.
    #[command(
        after_help = "Examples:\n  kiln agents\n  kiln agents --group web --json\n\n\
                            Read from the kiln-agents KV bucket, where each `kiln agent` records a heartbeat \
                            every --heartbeat-interval (10 s by default). STATE is what the agent said — idle, \
                            deploying, healthy (its VM's QEMU is alive), unhealthy (it is not) — or gone when \
                            no heartbeat came for three intervals. UPTIME is the running VM's, SEEN the time \
                            since the last heartbeat. Exit 1 when an agent listed is unhealthy or gone."
    )]
    Agents(AgentsArgs),
    /// Move an image through a group of agents in waves that stop at the first failure;
    /// `kiln rollout status|resume|abort|list` follow and steer it.
    #[command(
        after_help = "Examples:\n  kiln rollout 127.0.0.1:5000/kiln/app@sha256:3b6b… --group web --waves 1,25%,100% --bake 120 --follow\n  \
                      kiln rollout status r-20261206T201500-1a2b\n  kiln rollout resume r-20261206T201500-1a2b\n  \
                      kiln rollout abort r-20261206T201500-1a2b --reason \"wrong image\"\n\n\
                      The hosts are the group's agents that are not gone (`kiln agents --group G`), in name order, \
                      split into waves when the rollout starts: each wave is a number of hosts or a share of the group, \
                      and the last takes every host left. A rollout controller (one runs in `kiln up`; more with \
                      `kiln controller`) asks the wave's agents to deploy the image, at most --max-unavailable at a \
                      time; each pulls, checks, boots and health-checks it as it would a published image, and swaps \
                      or rolls back. When every host of the wave runs it, they must stay healthy on it for --bake \
                      seconds; then the next wave starts. More than --max-failures failed hosts halt the rollout: \
                      failed hosts keep their old VM, later waves are never touched, and `status` says why with the \
                      host's serial tail. The rollout lives in the kiln-rollouts bucket and on kiln.rollout.<id>.*, \
                      so it survives the CLI exiting and a controller dying (another takes over)."
    )]
    Rollout(RolloutArgs),
    /// Run a rollout controller: move the running rollouts wave by wave (`kiln up` runs one).
    #[command(
        after_help = "Example:\n  kiln controller --nats nats://10.0.0.5:4222\n\n\
                      Any number may run, on any host: each rollout is moved by one controller at a time, \
                      which holds a lease on it in the kiln-rollouts bucket; when it dies, another takes the \
                      rollout over within 5 s and goes on where it was."
    )]
    Controller(ControllerArgs),
    /// List recent builds, or show the stages of one: time, cache hit/miss and worker.
    #[command(
        after_help = "Examples:\n  kiln status\n  kiln status --limit 5 --json\n  \
                            kiln status 20261126T022407Z-9f3a01c2 --json\n\n\
                            Read back from the KILN stream (kiln.build.>); no database."
    )]
    Status(StatusArgs),
    /// Print every event of a build from the stream; -f follows it live until it ends.
    #[command(after_help = "Examples:\n  kiln logs 20261126T022407Z-9f3a01c2\n  \
                            kiln logs -f 20261126T022407Z-9f3a01c2 --json\n\n\
                            One line per event: time, stage, event, then worker, cache and duration, \
                            progress, or the error with file:line:column and help. Exit 1 when the \
                            build failed.")]
    Logs(LogsArgs),
    /// Remove what kiln cached and no retained build needs ($KILN_HOME; with --nats, the shared
    /// buckets too).
    #[command(
        after_help = "Examples:\n  kiln gc --keep-days 14\n  kiln gc --max-size 20G --dry-run\n  \
                            kiln gc --keep-days 7 --max-size 500G --nats nats://nats.example.com:4222 --json\n\n\
                            A stage record is kept while it was used within --keep-days (default 30 when \
                            neither flag is given) and, with --max-size, while it is among the most recently \
                            used that fit. Blobs (stage outputs, packages, Debian bases) are kept while a kept \
                            record names them; records go before the blobs they name, so a later build is a \
                            miss, never a broken hit. Kernel builds and partial downloads go by age and size. \
                            Builds running on this host (workers of this $KILN_HOME) keep what they use. With \
                            --nats, the kiln-stages KV bucket and the kiln-blobs object store are collected \
                            by the same rules; nothing there younger than --min-age goes (builds on other hosts \
                            may be using it). Sizes: 500M, 2G, 10GiB (powers of 1024)."
    )]
    Gc(GcArgs),
    /// Print the JSON Schema of recipes (the one in recipes/schema.json).
    #[command(after_help = "Example:\n  kiln schema > recipes/schema.json")]
    Schema,
    /// Print shell completions.
    #[command(
        after_help = "Examples:\n  kiln completions bash > ~/.local/share/bash-completion/completions/kiln\n  \
                            kiln completions zsh > ~/.zfunc/_kiln"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Options shared by commands that read a recipe.
#[derive(Debug, Args)]
pub struct RecipeOpts {
    /// Override a recipe parameter (repeatable); the value takes the type of the default.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// The project's templates directory (default: the nearest templates/ above the recipe).
    #[arg(long, value_name = "DIR")]
    pub templates: Option<PathBuf>,
    #[command(flatten)]
    pub limits: LimitOpts,
}

/// Bounds on loading a recipe (README, "Security model"): operator settings, never a recipe's.
#[derive(Debug, Clone, Args)]
pub struct LimitOpts {
    /// minijinja fuel per template render (one template instruction or 64 bytes of data each).
    #[arg(long, value_name = "N", default_value_t = crate::recipe::limits::DEFAULT_FUEL)]
    pub render_fuel: u64,
    /// Seconds one template render may take.
    #[arg(long, value_name = "SECS", default_value_t = crate::recipe::limits::DEFAULT_RENDER_TIMEOUT.as_secs())]
    pub render_timeout: u64,
    /// MiB one rendered file may be.
    #[arg(long, value_name = "MIB", default_value_t = crate::recipe::limits::DEFAULT_MAX_FILE_OUTPUT >> 20)]
    pub render_output: u64,
    /// MiB all renders of one recipe may produce together.
    #[arg(long, value_name = "MIB", default_value_t = crate::recipe::limits::DEFAULT_MAX_TOTAL_OUTPUT >> 20)]
    pub render_total_output: u64,
    /// MiB of address space a render child process may use.
    #[arg(long, value_name = "MIB", default_value_t = crate::recipe::limits::DEFAULT_MAX_MEMORY >> 20)]
    pub render_memory: u64,
    /// MiB a recipe, template or kernel configuration fragment file may be.
    #[arg(long, value_name = "MIB", default_value_t = crate::recipe::limits::DEFAULT_MAX_SOURCE_BYTES >> 20)]
    pub recipe_max_size: u64,
}

impl LimitOpts {
    fn limits(&self) -> crate::recipe::limits::Limits {
        crate::recipe::limits::Limits {
            fuel: self.render_fuel.max(1),
            render_timeout: std::time::Duration::from_secs(self.render_timeout.max(1)),
            max_file_output: self.render_output.max(1) << 20,
            max_total_output: self.render_total_output.max(1) << 20,
            max_memory: self.render_memory.max(64) << 20,
            max_source_bytes: self.recipe_max_size.max(1) << 20,
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    #[command(flatten)]
    pub opts: RecipeOpts,
    /// Print JSON instead of YAML.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Recipe files.
    #[arg(required = true)]
    pub recipes: Vec<PathBuf>,
    #[command(flatten)]
    pub opts: RecipeOpts,
    /// Print one JSON object per recipe.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    #[command(flatten)]
    pub opts: RecipeOpts,
    /// Output directory for the image, serial log and report.
    #[arg(short, long, value_name = "DIR", default_value = "out")]
    pub output: PathBuf,
    /// Skip the boot verification.
    #[arg(long)]
    pub no_verify: bool,
    /// Boot with this QEMU profile instead of the recipe's verify.profile (repeatable: each
    /// profile boots the image once).
    #[arg(long)]
    pub profile: Vec<String>,
    /// Directory of QEMU profiles (default: qemu/ of the kiln checkout, then built-ins).
    #[arg(long, value_name = "DIR")]
    pub profiles: Option<PathBuf>,
    /// Print the build report as JSON (progress events go to stderr as JSON lines).
    #[arg(long)]
    pub json: bool,
    /// Submit to this NATS server, whose workers (`kiln up`) build it, instead of starting a
    /// private one.
    #[arg(long = "nats", value_name = "URL", conflicts_with = "no_bus")]
    pub nats: Option<String>,
    #[command(flatten)]
    pub auth: NatsAuth,
    /// Run the stages in this process without NATS (no nats-server needed; measures the bus's
    /// overhead).
    #[arg(long)]
    pub no_bus: bool,
}

/// NATS credentials (for `--nats` on every command that connects).
#[derive(Debug, Args)]
pub struct NatsAuth {
    /// User name (with --nats-password).
    #[arg(long, env = "KILN_NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// Password (with --nats-user).
    #[arg(long, env = "KILN_NATS_PASSWORD", requires = "nats_user")]
    pub nats_password: Option<String>,
    /// Token authentication.
    #[arg(long, env = "KILN_NATS_TOKEN", conflicts_with = "nats_user")]
    pub nats_token: Option<String>,
    /// A .creds file (JWT + NKey).
    #[arg(long, env = "KILN_NATS_CREDS", conflicts_with_all = ["nats_user", "nats_token"])]
    pub nats_creds: Option<PathBuf>,
    /// Prefix of the reply subjects kiln subscribes to (default `_INBOX.<user>` with
    /// --nats-user, else `_INBOX`); the server must let this user subscribe to `PREFIX.>`.
    #[arg(long, env = "KILN_NATS_INBOX_PREFIX", value_name = "PREFIX")]
    pub nats_inbox_prefix: Option<String>,
    /// PEM file of the CA that signed the NATS servers' certificates (a private CA); implies
    /// TLS.
    #[arg(long, env = "KILN_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with --nats-tls-key).
    #[arg(
        long,
        env = "KILN_NATS_TLS_CERT",
        value_name = "FILE",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of --nats-tls-cert.
    #[arg(
        long,
        env = "KILN_NATS_TLS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
}

/// How many copies the NATS cluster keeps of what kiln creates.
#[derive(Debug, Args)]
pub struct ReplicaOpts {
    /// Replicas of the KILN stream, the stage consumers, the kiln-stages KV bucket and the
    /// kiln-blobs object store (1 to 5). Default: the NATS cluster's size up to 3 (1 for a
    /// single server). Existing streams are scaled up to it, never down.
    #[arg(long, env = "KILN_REPLICAS", value_name = "N", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: Option<u8>,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// The disk image (raw or qcow2).
    pub image: PathBuf,
    /// QEMU profile name (direct, uefi) or a profile file.
    #[arg(long, default_value = "uefi")]
    pub profile: String,
    /// Directory of QEMU profiles.
    #[arg(long, value_name = "DIR")]
    pub profiles: Option<PathBuf>,
    /// Text that must appear on the serial console.
    #[arg(long)]
    pub expect: String,
    /// Seconds to wait for it.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Direct boot: the kernel.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Direct boot: the initramfs.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Direct boot: the kernel command line (the profile adds its console settings).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Where the serial log goes (default: IMAGE.serial.log).
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
    /// Accelerator: `kvm` or `tcg` (default: the profile's choice; `auto` probes whether KVM can
    /// run a guest, once per host boot).
    #[arg(long, env = "KILN_ACCEL", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: Option<String>,
    /// Print the boot report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The disk image (raw or qcow2).
    pub image: PathBuf,
    /// Where to: `host:port/repository:tag` or `oci:/dir:tag`.
    #[arg(long, value_name = "REF")]
    pub to: String,
    /// Signing key (from `kiln keygen`); without it the image is published unsigned.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// More tags for the same manifest (repeatable).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Recipe name recorded in the image's config (default: the file name).
    #[arg(long)]
    pub recipe: Option<String>,
    /// Use plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// `host:port/repository:tag`, `…@sha256:…` or `oci:/dir:tag`.
    pub reference: String,
    /// Signing key (`kiln keygen`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Use plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The image, by digest: `host:port/repository@sha256:…`.
    pub reference: String,
    /// The channel to move: a tag of the repository (dev, canary, stable…).
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// Public key the image's signature must verify with (`kiln keygen`'s FILE.pub).
    #[arg(long, value_name = "KEYFILE")]
    pub trust: PathBuf,
    /// Public key of a verifier whose boot attestation counts (repeatable; at least one).
    #[arg(long, value_name = "KEYFILE", required = true)]
    pub trust_verifier: Vec<PathBuf>,
    /// Use plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The image, by digest: `host:port/repository@sha256:…`.
    pub reference: String,
    /// Why: kept with the revocation and shown in every refusal.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// Use plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// `host:port/repository:tag`, `…@sha256:…` or `oci:/dir:tag`.
    pub reference: String,
    /// Public key (`kiln keygen`'s FILE.pub) the signature and attestations must verify with.
    #[arg(long, value_name = "KEYFILE")]
    pub key: PathBuf,
    /// Public key of a verifier (`$KILN_HOME/verifier.key.pub` of the workers that boot images,
    /// or their --verifier-key) whose boot attestation counts (repeatable).
    #[arg(long, value_name = "KEYFILE")]
    pub verifier_key: Vec<PathBuf>,
    /// What must verify (comma-separated): signature, sbom, provenance, boot. Default: all, but
    /// boot only when a --verifier-key is given.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub require: Vec<crate::store::Requirement>,
    /// Also accept signatures made for this repository (repeatable).
    #[arg(long, value_name = "REPO")]
    pub signed_for: Vec<String>,
    /// Use plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SbomArgs {
    /// `host:port/repository:tag`, `…@sha256:…`, `oci:/dir:tag`, or an image file that `kiln
    /// build` delivered (its SBOM is beside it, as IMAGE.spdx.json).
    #[arg(value_name = "REF|IMAGE")]
    pub reference: String,
    /// Public key the SBOM attestation must be signed with (for a reference).
    #[arg(long, value_name = "KEYFILE")]
    pub key: Option<PathBuf>,
    /// Use plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// `host:port/repository:tag`, `…@sha256:…` or `oci:/dir:tag`.
    pub reference: String,
    /// Output file (written as FILE.partial, renamed when verified).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Public key the image's signature must verify with; unsigned images are then refused.
    #[arg(long, value_name = "KEYFILE")]
    pub trust: Option<PathBuf>,
    /// Also accept signatures made for this repository (repeatable): a trusted copy of images
    /// signed for another repository. Without it a signature counts only in its own repository.
    #[arg(long, value_name = "REPO", requires = "trust")]
    pub signed_for: Vec<String>,
    /// An image already here (an earlier version, repeatable): the disk is rebuilt from its
    /// chunks plus the chunks fetched, when the image has a chunk index (`kiln publish` makes
    /// one); every chunk and the whole disk are checked.
    #[arg(long, value_name = "FILE")]
    pub seed: Vec<PathBuf>,
    /// Use plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DiskArgs {
    /// Directory holding the root filesystem (ext4, root-x86-64 partition).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Directory holding the EFI System Partition's files (FAT32).
    #[arg(long, value_name = "DIR")]
    pub esp: Option<PathBuf>,
    /// A data partition (ext4) from DIR with SIZE (`2G`, `auto`, `rest`); repeatable.
    #[arg(long, value_name = "DIR:SIZE")]
    pub data: Vec<String>,
    /// Disk size: `auto` (content plus headroom) or a size such as `8G`.
    #[arg(long, default_value = "auto")]
    pub size: String,
    /// ESP size (`auto` or a size).
    #[arg(long, default_value = "auto")]
    pub esp_size: String,
    /// Root partition size (`auto`, `rest` or a size).
    #[arg(long, default_value = "auto")]
    pub root_size: String,
    /// Output format.
    #[arg(long, default_value = "qcow2", value_parser = ["raw", "qcow2"])]
    pub format: String,
    /// qcow2: compress clusters.
    #[arg(long)]
    pub compress: bool,
    /// Seed for every identifier on the disk (GUIDs, UUIDs, serials); same seed, same bytes.
    #[arg(long, default_value = "kiln")]
    pub seed: String,
    /// Timestamp for every file (default: SOURCE_DATE_EPOCH, else 0): mtimes later than it are
    /// clamped.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub epoch: i64,
    /// Output file (appears only when complete).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Print the layout and image report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How to reach NATS.
#[derive(Debug, Args)]
pub struct NatsOpts {
    /// NATS server URL, or several separated by commas (seeds of a cluster: kiln connects to
    /// whichever answers), e.g. `tls://n1:4222,tls://n2:4222`.
    #[arg(
        long = "nats",
        env = "KILN_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: String,
    #[command(flatten)]
    pub auth: NatsAuth,
}

impl NatsOpts {
    fn connect_options(&self) -> crate::bus::ConnectOptions {
        self.auth.connect_options(&self.url)
    }

    /// [`NatsOpts::connect_options`] for a process that creates streams and buckets.
    fn creating(&self, replicas: &ReplicaOpts) -> crate::bus::ConnectOptions {
        let mut o = self.connect_options();
        o.replicas = replicas.replicas.map(usize::from);
        o
    }
}

impl NatsAuth {
    /// How to connect to `url` with these credentials.
    fn connect_options(&self, url: &str) -> crate::bus::ConnectOptions {
        use crate::bus::Auth;
        let mut o = crate::bus::ConnectOptions::new(url.to_string());
        o.auth = match (
            &self.nats_user,
            &self.nats_password,
            &self.nats_token,
            &self.nats_creds,
        ) {
            (Some(u), Some(p), _, _) => Auth::UserPassword {
                user: u.clone(),
                password: p.clone(),
            },
            (_, _, Some(t), _) => Auth::Token(t.clone()),
            (_, _, _, Some(c)) => Auth::CredsFile(c.clone()),
            _ => Auth::None,
        };
        o.inbox_prefix = self.nats_inbox_prefix.clone();
        o.tls = crate::bus::TlsFiles {
            ca: self.nats_tls_ca.clone(),
            cert: self.nats_tls_cert.clone(),
            key: self.nats_tls_key.clone(),
        };
        o
    }
}

/// How a stage's durable consumer redelivers (applied when the workers create the consumers).
#[derive(Debug, Args)]
pub struct RetryOpts {
    /// Seconds without an ack or progress ack before a message is delivered again (to this or
    /// another worker): how soon a killed worker's message is taken over. Failed attempts are
    /// retried after 1×, 2× and 10× this. Default 30.
    #[arg(long, env = "KILN_ACK_WAIT", value_name = "SECS", value_parser = parse_ack_wait)]
    pub ack_wait: Option<std::time::Duration>,
    /// Deliveries of one message in total, the first included; the last failed attempt
    /// publishes `failed`. Default 4.
    #[arg(long, env = "KILN_MAX_DELIVER", value_name = "N", value_parser = parse_max_deliver)]
    pub max_deliver: Option<i64>,
}

impl RetryOpts {
    fn policy(&self) -> crate::bus::RetryPolicy {
        use crate::bus::RetryPolicy;
        let default = RetryPolicy::default();
        match (self.ack_wait, self.max_deliver) {
            (None, None) => default,
            (wait, max) => RetryPolicy::scaled(
                wait.unwrap_or(default.ack_wait),
                max.unwrap_or(default.max_deliver),
            ),
        }
    }
}

fn parse_ack_wait(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 30 or 0.5)"))?;
    if !(secs.is_finite() && (0.05..=86_400.0).contains(&secs)) {
        return Err(format!("{s} s is out of range: give 0.05 to 86400 seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn parse_max_deliver(s: &str) -> Result<i64, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: give a number of deliveries of at least 1")),
    }
}

fn parse_read_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: give a number of seconds from 0.1 to 3600")),
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub replicas: ReplicaOpts,
    #[command(flatten)]
    pub retry: RetryOpts,
    /// Directory of QEMU profiles (default: qemu/ of the kiln checkout, then built-ins).
    #[arg(long, value_name = "DIR")]
    pub profiles: Option<PathBuf>,
    /// Serve the HTTP API on this address (`none`: no API) [default: 127.0.0.1:7070; when that
    /// port is taken, the workers run without the API]. Other than loopback only behind a
    /// firewall or TLS proxy.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Read the API's bearer token from this file (default: $KILN_API_TOKEN, else
    /// $KILN_HOME/api-token, generated when missing).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Seconds an API client may take to send a request's headers, and then its body; a client
    /// that stalls longer is disconnected.
    #[arg(long, env = "KILN_API_READ_TIMEOUT", value_name = "SECS", default_value_t = 10.0,
          value_parser = parse_read_timeout)]
    pub api_read_timeout: f64,
    /// A repository `POST /v1/hooks/git` may build (repeatable; none: the hook builds nothing).
    #[arg(long = "hook-repo", value_name = "URL")]
    pub hook_repos: Vec<String>,
    /// Which files of a hooked repository are recipes.
    #[arg(long, value_name = "GLOB", default_value = "recipes/*.yaml")]
    pub hook_recipes: String,
    /// Check hook payload signatures (X-Hub-Signature-256) against the secret in this file.
    #[arg(long, value_name = "FILE")]
    pub hook_secret_file: Option<PathBuf>,
    /// Collect this worker's $KILN_HOME when it grows past SIZE (e.g. 20G), after a stage;
    /// what running builds use stays.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub cache_max: Option<u64>,
    /// Do not run a rollout controller in this process (run `kiln controller` elsewhere).
    #[arg(long)]
    pub no_controller: bool,
    #[command(flatten)]
    pub access: AccessOpts,
    #[command(flatten)]
    pub limits: LimitOpts,
    #[command(flatten)]
    pub publish: PublishOpts,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The repository: a URL (https://, http://, file://) or a local path.
    #[arg(long)]
    pub repo: String,
    /// The branch or tag to watch.
    #[arg(long = "ref", value_name = "REF")]
    pub git_ref: String,
    /// Which files are recipes (relative to the repository root).
    #[arg(long, value_name = "GLOB", default_value = "recipes/*.yaml")]
    pub recipes: String,
    /// Seconds between polls.
    #[arg(long, value_name = "S", default_value_t = 60.0)]
    pub interval: f64,
    /// Poll once and exit.
    #[arg(long)]
    pub once: bool,
    /// With no state yet: record the ref's current commit as seen, without building.
    #[arg(long)]
    pub baseline: bool,
    /// Where to keep what was seen (default: $KILN_HOME/watch/<hash>.json).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Override a recipe parameter in every build (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// Boot with these profiles (repeatable; default: each recipe's).
    #[arg(long)]
    pub profile: Vec<String>,
    /// Skip the boot verification.
    #[arg(long)]
    pub no_verify: bool,
    /// Print one JSON object per submitted build.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

/// What build requests may reach on this worker: operator configuration, never request input
/// (README, "Security model").
#[derive(Debug, Args)]
pub struct AccessOpts {
    /// A directory whose recipe files (and templates directories) build requests may name by
    /// path (repeatable). Default: none, so path recipes are refused; send recipes inline or
    /// from git.
    #[arg(long = "recipes", value_name = "DIR")]
    pub recipes: Vec<PathBuf>,
    /// A git repository build requests may build recipes from (repeatable). Default: none
    /// (`kiln up` also allows its --hook-repo repositories).
    #[arg(long = "allow-git", value_name = "URL")]
    pub allow_git: Vec<String>,
    /// An environment variable recipes may read as `env.NAME` (repeatable). Default: none, so
    /// declared variables read as their defaults. KILN_*, NATS_* and names containing TOKEN,
    /// SECRET, PASSWORD, PASSWD, CREDENTIAL, CREDS or PRIVATE can never be allowed.
    #[arg(long = "allow-env", value_name = "NAME")]
    pub allow_env: Vec<String>,
}

impl AccessOpts {
    fn access(
        &self,
        extra_git: &[String],
    ) -> Result<crate::pipeline::access::RecipeAccess, BadInput> {
        let mut git = self.allow_git.clone();
        git.extend(extra_git.iter().cloned());
        crate::pipeline::access::RecipeAccess::new(
            &self.recipes,
            &git,
            &self.allow_env,
            &crate::home::kiln_home(),
        )
        .map_err(BadInput::Message)
    }
}

/// Where the publish stage pushes verified images.
#[derive(Debug, Args)]
pub struct PublishOpts {
    /// Registry (`host:port`) or OCI layout directory (`oci:/dir`) for recipes with `publish:`;
    /// without it the publish stage completes as skipped.
    #[arg(long, value_name = "REGISTRY|oci:DIR")]
    pub publish_to: Option<String>,
    /// Signing key (`kiln keygen`: ECDSA P-256 or Ed25519) for published images.
    #[arg(long, value_name = "FILE", requires = "publish_to")]
    pub key: Option<PathBuf>,
    /// Registry user (password from $KILN_REGISTRY_PASSWORD; default: $KILN_REGISTRY_USER).
    #[arg(long, value_name = "USER", requires = "publish_to")]
    pub registry_user: Option<String>,
    /// Plain http for a registry that is not on loopback.
    #[arg(long, requires = "publish_to")]
    pub insecure: bool,
    /// The key the verify stage signs its boot attestations with (default:
    /// `$KILN_HOME/verifier.key`, made on first start). Agents trust its `.pub` with
    /// `--trust-verifier`.
    #[arg(long, value_name = "FILE")]
    pub verifier_key: Option<PathBuf>,
    /// The key the disk stage signs systemd-boot and unified kernel images with for recipes
    /// with `boot.secure_boot` (its certificate at FILE.crt; `kiln keygen --secure-boot`).
    /// Default: `$KILN_HOME/secureboot.key`, made on first use. Give every worker of a farm the
    /// same key.
    #[arg(long, value_name = "FILE")]
    pub secure_boot_key: Option<PathBuf>,
}

impl PublishOpts {
    fn target(&self) -> Option<crate::pipeline::stages::PublishTarget> {
        let to = self.publish_to.clone()?;
        Some(crate::pipeline::stages::PublishTarget {
            to,
            key: self.key.clone(),
            store: crate::store::StoreOptions {
                insecure: self.insecure,
                credentials: self.registry_user.as_ref().map(|u| {
                    crate::store::registry::Credentials {
                        username: u.clone(),
                        password: std::env::var("KILN_REGISTRY_PASSWORD").unwrap_or_default(),
                    }
                }),
                ..Default::default()
            },
        })
    }
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub replicas: ReplicaOpts,
    #[command(flatten)]
    pub retry: RetryOpts,
    /// Comma-separated stages to run (default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_stage)]
    pub stages: Vec<crate::bus::Stage>,
    /// Collect this worker's $KILN_HOME when it grows past SIZE (e.g. 20G), after a stage;
    /// what running builds use stays.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub cache_max: Option<u64>,
    /// Directory of QEMU profiles (default: qemu/ of the kiln checkout, then built-ins).
    #[arg(long, value_name = "DIR")]
    pub profiles: Option<PathBuf>,
    #[command(flatten)]
    pub access: AccessOpts,
    #[command(flatten)]
    pub limits: LimitOpts,
    #[command(flatten)]
    pub publish: PublishOpts,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The recipe file (with --git: ignored unless --path is missing, then its path in the repo).
    pub recipe: Option<PathBuf>,
    /// Override a recipe parameter (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// Build the recipe from this git repository.
    #[arg(long, requires = "git_ref")]
    pub git: Option<String>,
    /// Branch, tag or commit (with --git).
    #[arg(long = "ref", requires = "git")]
    pub git_ref: Option<String>,
    /// Path of the recipe in the repository (with --git).
    #[arg(long, requires = "git")]
    pub path: Option<String>,
    /// Boot with these profiles (repeatable; default: the recipe's).
    #[arg(long)]
    pub profile: Vec<String>,
    /// Skip the boot verification.
    #[arg(long)]
    pub no_verify: bool,
    /// Use this build id (default: a new one).
    #[arg(long)]
    pub id: Option<String>,
    /// Print events until the build ends; exit 1 when a stage fails.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: give up following after this many seconds (exit 1; the build itself goes
    /// on, `kiln status ID` shows it). Default: follow until the build ends.
    #[arg(long, value_name = "SECONDS", requires = "follow", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// Print JSON (one object per line).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub replicas: ReplicaOpts,
    /// This host's name in subjects and messages (kiln.deploy.<NAME>.completed).
    #[arg(long, value_name = "HOST")]
    pub name: String,
    /// The repository and tag to run, e.g. 127.0.0.1:5000/team/web:production.
    #[arg(long, value_name = "REPO:TAG")]
    pub watch: String,
    /// Public key (`kiln keygen`'s FILE.pub) images must be signed with.
    #[arg(long, value_name = "KEYFILE")]
    pub trust: PathBuf,
    /// Public key of a verifier whose boot attestation counts (repeatable): the
    /// `verifier.key.pub` in the `$KILN_HOME` of the workers that boot images (or their
    /// --verifier-key's).
    #[arg(long, value_name = "KEYFILE")]
    pub trust_verifier: Vec<PathBuf>,
    /// What an image must carry (comma-separated: signature, boot, sbom, provenance). The
    /// signature is always checked; a boot attestation by a --trust-verifier key is required by
    /// default, so an image published outside the pipeline does not run unless this says so.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [crate::store::Requirement::Signature, crate::store::Requirement::Boot])]
    pub require: Vec<crate::store::Requirement>,
    /// Also run images whose signature was made for this repository (repeatable); by default
    /// only signatures made for the watched repository count.
    #[arg(long, value_name = "REPO")]
    pub signed_for: Vec<String>,
    /// Where the agent keeps its state, pulled images and VM directories.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Stable TCP address forwarded to the running VM's health port (switched at each swap).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics on `GET /metrics` at this address (`PORT` alone: 127.0.0.1:PORT).
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// QEMU machine profile: `uefi` (the image's own firmware and boot loader start it), or
    /// `direct` (faster, for test fleets: QEMU boots the kernel and initrd of the image's
    /// default boot entry, read out of its ESP; not for unified kernel images).
    #[arg(long, default_value = "uefi")]
    pub profile: String,
    /// Directory of QEMU profiles (default: qemu/ of the kiln checkout, then built-ins).
    #[arg(long, value_name = "DIR")]
    pub profiles: Option<PathBuf>,
    /// Healthy when a serial console line contains TEXT (default: the image's deploy.health_serial).
    #[arg(long, value_name = "TEXT")]
    pub health_serial: Option<String>,
    /// Healthy when this guest TCP port answers (default: the image's deploy.health_port).
    #[arg(long, value_name = "PORT")]
    pub health_port: Option<u16>,
    /// Seconds a new VM has to become healthy (default: the image's, else 120).
    #[arg(long, value_name = "SECONDS")]
    pub health_timeout: Option<u64>,
    /// Plain http for a registry that is not on loopback.
    #[arg(long)]
    pub insecure: bool,
    /// A group this agent joins (repeatable), e.g. `--group web --group eu-1`: `kiln agents
    /// --group` lists by it.
    #[arg(long = "group", value_name = "GROUP", value_parser = parse_group)]
    pub groups: Vec<String>,
    /// Seconds between heartbeats in the kiln-agents bucket (three missed: `gone`).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval: u64,
    /// Seconds between health checks of the running VM (its QEMU alive, its health port
    /// answering); 0 turns them off.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub health_interval: u64,
    /// Failed health checks in a row before the agent acts: it restarts the VM the first
    /// time, and goes back to the image before it the next.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub health_retries: u32,
    /// Pulled images to keep in the state directory (the running one and the one before it
    /// always are): the next image is rebuilt from their chunks, fetching only what changed.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub keep: u32,
    /// Print every result as a JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep stage records used within this many days (0: only what running builds use).
    #[arg(long, value_name = "N")]
    pub keep_days: Option<f64>,
    /// Keep at most this much, the most recently used first (e.g. 500M, 2G, 10GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_size: Option<u64>,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also collect the kiln-stages KV bucket and the kiln-blobs object store on this server.
    #[arg(long = "nats", value_name = "URL")]
    pub nats: Option<String>,
    /// With --nats: nothing in the buckets younger than this many minutes is removed.
    #[arg(
        long,
        value_name = "MINUTES",
        default_value_t = 60.0,
        requires = "nats"
    )]
    pub min_age: f64,
    #[command(flatten)]
    pub auth: NatsAuth,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::gc::parse_size(s)
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The build id (default: list recent builds).
    pub build: Option<String>,
    /// How many builds to list, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Show the NATS cluster instead: the replicas and the leader of the KILN stream, the
    /// kiln-stages KV bucket and the kiln-blobs object store.
    #[arg(long, conflicts_with = "build")]
    pub cluster: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Only the agents of this group (`kiln agent --group`).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Print JSON: `{"agents": [...]}`, each its last heartbeat with `state` and `last_seen_s`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub action: Option<RolloutAction>,
    /// The image, by digest: `host:port/repository@sha256:…`.
    #[arg(required = true)]
    pub reference: Option<String>,
    /// The group of agents to roll out to (`kiln agent --group`).
    #[arg(long, value_name = "GROUP", required = true)]
    pub group: Option<String>,
    /// Wave sizes, comma-separated: a number of hosts or a share of the group; the last wave
    /// takes every host left.
    #[arg(long, value_name = "LIST", default_value = "1,25%,100%")]
    pub waves: String,
    /// Hosts of a wave deploying at the same time.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_unavailable: u32,
    /// Failed hosts tolerated before the rollout halts.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_failures: u32,
    /// Seconds every host of a wave must stay healthy on the image before the next wave.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub bake: u64,
    /// Seconds an agent has to pull, boot and health-check the image before it counts as failed.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub deploy_timeout: u64,
    /// Print each step until the rollout ends; exit 1 unless it completes.
    #[arg(long)]
    pub follow: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// Show a rollout: its waves, each host's state, why it halted.
    Status(RolloutIdArgs),
    /// Go on with a halted rollout: its failed hosts are asked again, then the next waves.
    Resume(RolloutIdArgs),
    /// Stop a rollout: nothing more is deployed (hosts keep what they run).
    Abort(RolloutAbortArgs),
    /// List the rollouts, newest last.
    List(RolloutListArgs),
}

#[derive(Debug, Args)]
pub struct RolloutIdArgs {
    /// The rollout's id (`kiln rollout` prints it).
    pub id: String,
    /// With `status`: print each step until the rollout ends; exit 1 unless it completes.
    #[arg(long)]
    pub follow: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct RolloutAbortArgs {
    pub id: String,
    /// Why (kept with the rollout).
    #[arg(long, value_name = "TEXT", default_value = "aborted by an operator")]
    pub reason: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct RolloutListArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// The controller's name in the rollouts it moves (default: host name and process id).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    #[command(flatten)]
    pub nats: NatsOpts,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The build id.
    pub build: String,
    /// Follow the build live until it completes or fails.
    #[arg(short, long)]
    pub follow: bool,
    /// Print JSON (one object per event).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOpts,
}

fn parse_stage(s: &str) -> Result<crate::bus::Stage, String> {
    match crate::bus::Stage::from_name(s.trim()) {
        Some(stage) => Ok(stage),
        None => Err(format!(
            "unknown stage `{s}` (stages: source, render, rootfs, kernel, disk, verify, publish)"
        )),
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE (e.g. --set hostname=demo)")),
    }
}

impl RecipeOpts {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            set: self.set.clone(),
            templates_dir: self.templates.clone(),
            limits: self.limits.limits(),
            ..LoadOptions::default()
        }
    }
}

/// The progress bars on stderr, when `kiln build` shows them: log lines are written around them.
static PROGRESS_BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();

/// stderr for log lines, which hides the progress bars while it writes.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match PROGRESS_BARS.get() {
            Some(bars) => bars.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Set up logging to stderr.
pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("kiln={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .try_init();
}

/// Run the command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Render(args) => render(args),
        Command::Check(args) => check(args),
        Command::Build(args) => build(args, quiet),
        Command::Boot(args) => boot(args),
        Command::Disk(args) => disk(args),
        Command::Keygen {
            output,
            secure_boot: true,
            name,
            ..
        } => secure_boot_keygen(&output, &name),
        Command::Keygen {
            output, key_type, ..
        } => keygen(&output, key_type),
        Command::Sign(args) => sign(args),
        Command::Promote(args) => promote(args),
        Command::Revoke(args) => revoke(args),
        Command::Verify(args) => verify_image(args),
        Command::Sbom(args) => sbom(args),
        Command::Publish(args) => publish(args),
        Command::Pull(args) => pull(args),
        Command::Images {
            target,
            insecure,
            json,
        } => images(&target, insecure, json),
        Command::Up(args) => nats_up(args),
        Command::Worker(args) => nats_worker(args),
        Command::Submit(args) => nats_submit(args),
        Command::Watch(args) => watch(args),
        Command::Status(args) => nats_status(args),
        Command::Agents(args) => agents(args),
        Command::Rollout(args) => rollout(args),
        Command::Controller(args) => controller(args),
        Command::Logs(args) => nats_logs(args),
        Command::Agent(args) => agent(args),
        Command::Gc(args) => gc(args, quiet),
        Command::Schema => {
            let text = serde_json::to_string_pretty(&recipe::schema::json_schema())?;
            println!("{text}");
            Ok(0)
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut std::io::stdout());
            Ok(0)
        }
    }
}

fn report(d: &Diagnostic) {
    eprint!("{d}");
}

fn render(args: RenderArgs) -> anyhow::Result<i32> {
    let loaded = recipe::load(&args.recipe, &args.opts.load_options())?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "recipe": loaded.recipe,
            "build": {
                "inputs": loaded.inputs,
                "source_date_epoch": loaded.source_date_epoch,
            },
            "params": loaded.params,
            "files": loaded.rendered_files,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        writeln!(out, "# inputs: {}", loaded.inputs)?;
        writeln!(out, "# source_date_epoch: {}", loaded.source_date_epoch)?;
        let mut options = serde_saphyr::SerializerOptions::default();
        options.prefer_block_scalars = false;
        let yaml = serde_saphyr::to_string_with_options(&loaded.recipe, options)
            .map_err(|e| anyhow::anyhow!("printing the recipe as YAML: {e}"))?;
        write!(out, "{yaml}")?;
        for (path, text) in &loaded.rendered_files {
            writeln!(out, "# --- {path} (rendered template)")?;
            for line in text.lines() {
                writeln!(out, "#   {line}")?;
            }
        }
    }
    Ok(0)
}

fn check(args: CheckArgs) -> anyhow::Result<i32> {
    let mut failed = 0;
    let opts = args.opts.load_options();
    let mut out = std::io::stdout().lock();
    for path in &args.recipes {
        match recipe::load(path, &opts) {
            Ok(loaded) => {
                if args.json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"recipe": path, "ok": true, "inputs": loaded.inputs})
                    )?;
                } else {
                    writeln!(out, "ok  {}  {}", path.display(), loaded.inputs)?;
                }
            }
            Err(d) => {
                failed += 1;
                if args.json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"recipe": path, "ok": false, "error": d.to_json()})
                    )?;
                } else {
                    report(&d);
                }
            }
        }
    }
    if failed > 0 {
        tracing::error!("{failed} of {} recipes failed", args.recipes.len());
        return Ok(EXIT_RECIPE);
    }
    Ok(0)
}

fn disk(args: DiskArgs) -> anyhow::Result<i32> {
    use crate::disk::build::{DiskSpec, PartitionInput, build_disk, image_format};
    use crate::disk::gpt::PartitionKind;
    use crate::disk::image::ImageOptions;
    use crate::disk::layout::{Filesystem, parse_size};
    use crate::tree::Tree;
    use anyhow::Context;

    let usage = |msg: String| -> anyhow::Result<i32> { Err(BadInput::Message(msg).into()) };
    let read_tree = |dir: &PathBuf| -> anyhow::Result<Tree> {
        let mut tree = Tree::from_host_dir(dir)
            .with_context(|| format!("reading the tree {}", dir.display()))?;
        tree.clamp_mtimes(args.epoch);
        Ok(tree)
    };
    let size = |text: &str, what: &str| -> Result<crate::disk::layout::Size, String> {
        parse_size(text).map_err(|e| format!("{what}: {e}"))
    };
    let mut partitions = Vec::new();
    if let Some(esp) = &args.esp {
        let esp_size = match size(&args.esp_size, "--esp-size") {
            Ok(s) => s,
            Err(e) => return usage(e),
        };
        partitions.push(PartitionInput {
            name: "esp".into(),
            kind: PartitionKind::Esp,
            filesystem: Filesystem::Fat32,
            size: esp_size,
            label: Some("ESP".into()),
            tree: Some(read_tree(esp)?),
        });
    }
    let root_size = match size(&args.root_size, "--root-size") {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    partitions.push(PartitionInput {
        name: "root".into(),
        kind: PartitionKind::RootX86_64,
        filesystem: Filesystem::Ext4,
        size: root_size,
        label: Some("root".into()),
        tree: Some(read_tree(&args.root)?),
    });
    for (i, spec) in args.data.iter().enumerate() {
        let Some((dir, sz)) = spec.rsplit_once(':') else {
            return usage(format!("--data {spec}: expected DIR:SIZE, e.g. srv/:2G"));
        };
        let sz = match size(sz, "--data") {
            Ok(s) => s,
            Err(e) => return usage(e),
        };
        let name = if i == 0 {
            "data".to_string()
        } else {
            format!("data{}", i + 1)
        };
        partitions.push(PartitionInput {
            name: name.clone(),
            kind: PartitionKind::LinuxData,
            filesystem: Filesystem::Ext4,
            size: sz,
            label: Some(name),
            tree: Some(read_tree(&PathBuf::from(dir))?),
        });
    }
    let disk_size = match size(&args.size, "--size") {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    let Some(format) = image_format(&args.format) else {
        return usage(format!("--format {}: use raw or qcow2", args.format));
    };
    let image = ImageOptions {
        format,
        compress: args.compress,
        ..ImageOptions::default()
    };
    let spec = DiskSpec {
        size: disk_size,
        image,
        seed: args.seed.clone(),
        epoch: args.epoch,
        partitions,
        verity: None,
    };
    let started = std::time::Instant::now();
    // What does not fit the disk or its filesystems is the trees' or the sizes' fault.
    let report = build_disk(&spec, &args.output).map_err(BadInput::error)?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    if args.json {
        let parts: Vec<_> = report
            .layout
            .partitions
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "type": p.kind.name(),
                    "offset": p.offset,
                    "size": p.size,
                    "partuuid": uuid::Uuid::from_bytes(p.guid).to_string(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "output": args.output,
            "format": args.format,
            "disk_size": report.layout.disk_size,
            "file_size": report.image.file_size,
            "allocated_bytes": report.image.allocated_bytes,
            "partitions": parts,
            "seconds": elapsed,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "{}: {} disk, {} MiB, file {} MiB, {:.2} s",
            args.output.display(),
            args.format,
            report.layout.disk_size >> 20,
            report.image.file_size >> 20,
            elapsed
        )?;
        for p in &report.layout.partitions {
            writeln!(
                out,
                "  {:<8} {:<12} at {:>6} MiB, {:>6} MiB, PARTUUID {}",
                p.name,
                p.kind.name(),
                p.offset >> 20,
                p.size >> 20,
                uuid::Uuid::from_bytes(p.guid)
            )?;
        }
    }
    Ok(0)
}

/// How `kiln build` shows its stages on stderr.
enum ProgressMode {
    /// A bar per stage (stderr is a terminal).
    Bars {
        multi: indicatif::MultiProgress,
        bars: Vec<(String, indicatif::ProgressBar)>,
    },
    /// A line per event, progress at most once a second per stage.
    Lines {
        last: Vec<(String, std::time::Instant)>,
    },
    /// One JSON object per event (`--json`).
    Json,
    /// Nothing (`-q`).
    Quiet,
}

/// `kiln build`'s stage display, shared by the NATS and the in-process paths.
struct StageDisplay(std::sync::Mutex<ProgressMode>);

impl StageDisplay {
    fn new(quiet: bool, json: bool) -> Self {
        let mode = if quiet {
            ProgressMode::Quiet
        } else if json {
            ProgressMode::Json
        } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressMode::Bars {
                multi: PROGRESS_BARS
                    .get_or_init(indicatif::MultiProgress::new)
                    .clone(),
                bars: Vec::new(),
            }
        } else {
            ProgressMode::Lines { last: Vec::new() }
        };
        StageDisplay(std::sync::Mutex::new(mode))
    }

    fn note(
        &self,
        stage: &str,
        note: &crate::pipeline::build::StageNote,
        json: impl Fn() -> serde_json::Value,
    ) {
        use crate::pipeline::build::StageNote;
        let mut mode = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *mode {
            ProgressMode::Quiet => {}
            ProgressMode::Json => eprintln!("{}", json()),
            ProgressMode::Lines { last } => {
                let text = match note {
                    StageNote::Started => "started".to_string(),
                    StageNote::Progress(p) => {
                        let now = std::time::Instant::now();
                        let done = p.fraction.is_some_and(|f| f >= 1.0);
                        match last.iter_mut().find(|(s, _)| s == stage) {
                            Some((_, t)) if !done && now.duration_since(*t).as_secs_f64() < 1.0 => {
                                return;
                            }
                            Some((_, t)) => *t = now,
                            None => last.push((stage.to_string(), now)),
                        }
                        match p.fraction {
                            Some(f) => format!("{:>3.0}% {}", f * 100.0, p.message),
                            None => p.message.clone(),
                        }
                    }
                    StageNote::Completed { cache, seconds } => {
                        format!("completed ({cache}, {seconds:.2} s)")
                    }
                };
                eprintln!("{stage:>8}: {text}");
            }
            ProgressMode::Bars { multi, bars } => {
                let bar = match bars.iter().find(|(s, _)| s == stage) {
                    Some((_, b)) => b.clone(),
                    None => {
                        let b = multi.add(indicatif::ProgressBar::new(100));
                        let style = indicatif::ProgressStyle::with_template(
                            "{prefix:>8} [{bar:24}] {percent:>3}% {elapsed:>4} {wide_msg}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("=> ");
                        b.set_style(style);
                        b.set_prefix(stage.to_string());
                        b.enable_steady_tick(std::time::Duration::from_millis(200));
                        bars.push((stage.to_string(), b.clone()));
                        b
                    }
                };
                match note {
                    StageNote::Started => bar.set_message("started"),
                    StageNote::Progress(p) => {
                        if let Some(f) = p.fraction {
                            bar.set_position((f * 100.0) as u64);
                        }
                        bar.set_message(p.message.clone());
                    }
                    StageNote::Completed { cache, seconds } => {
                        bar.set_position(100);
                        bar.finish_with_message(format!("{cache} {seconds:.2} s"));
                    }
                }
            }
        }
    }

    /// A stage failed: its bar stops where it was.
    fn failed(&self, stage: &str, json: impl Fn() -> serde_json::Value) {
        let mode = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*mode {
            ProgressMode::Bars { bars, .. } => {
                if let Some((_, b)) = bars.iter().find(|(s, _)| s == stage) {
                    b.abandon_with_message("failed");
                }
            }
            ProgressMode::Lines { .. } => eprintln!("{stage:>8}: failed"),
            ProgressMode::Json => eprintln!("{}", json()),
            ProgressMode::Quiet => {}
        }
    }

    /// A bus event, shown like the in-process notes.
    fn event(&self, e: &crate::bus::StageEvent) {
        use crate::bus::StageEvent;
        use crate::pipeline::build::StageNote;
        use crate::pipeline::stages::ProgressUpdate;
        let json = || crate::pipeline::events::event_json(e);
        let stage = e.stage().name();
        match e {
            StageEvent::Started(_) => self.note(stage, &StageNote::Started, json),
            StageEvent::Progress(p) => self.note(
                stage,
                &StageNote::Progress(ProgressUpdate::new(
                    p.fraction,
                    p.message.clone().unwrap_or_default(),
                )),
                json,
            ),
            StageEvent::Completed(c) => self.note(
                stage,
                &StageNote::Completed {
                    cache: c.cache,
                    seconds: c.duration_ms as f64 / 1000.0,
                },
                json,
            ),
            StageEvent::Failed(_) => self.failed(stage, json),
        }
    }
}

/// Print a `failed` message's error like the in-process build prints its errors: the whole
/// report when there is one (a recipe diagnostic with its source line, a boot's serial tail).
fn report_failure(error: &crate::bus::ErrorInfo) {
    match &error.detail {
        Some(detail) => {
            let detail = detail.trim_end();
            if detail.starts_with("error:") {
                eprintln!("{detail}");
            } else {
                eprintln!("error: {detail}");
            }
            if let Some(help) = &error.help
                && !detail.contains(help.as_str())
            {
                eprintln!("  = help: {help}");
            }
        }
        None => {
            match error.location() {
                Some(place) => eprintln!("error: {place}: {}", error.message),
                None => eprintln!("error: {}", error.message),
            }
            if let Some(help) = &error.help {
                eprintln!("  = help: {help}");
            }
        }
    }
}

/// `--profile` arguments as names and the profile directory: the operator may name profile
/// files (all in one directory) instead of `--profiles DIR` and names.
fn profile_names(
    profiles: &[String],
    dir: Option<PathBuf>,
) -> Result<(Vec<String>, Option<PathBuf>), BadInput> {
    let mut names = Vec::new();
    let mut dir = dir;
    for p in profiles {
        let (file_dir, name) = crate::verify::ProfileDir::split_path(p);
        if let Some(d) = file_dir {
            match &dir {
                Some(other) if *other != d => {
                    return Err(BadInput::Message(format!(
                        "--profile {p}: profile files must all be in one directory ({} here); \
                         put them there and pass --profiles DIR with their names",
                        other.display()
                    )));
                }
                _ => dir = Some(d),
            }
        }
        names.push(name);
    }
    Ok((names, dir))
}

fn build(args: BuildArgs, quiet: bool) -> anyhow::Result<i32> {
    use crate::pipeline::build::{BuildOptions, build};
    use crate::pipeline::bus_build::{BusTarget, build_over_bus};
    let (profiles, profiles_dir) = profile_names(&args.profile, args.profiles.clone())?;
    let opts = BuildOptions {
        recipe: args.recipe.clone(),
        load: args.opts.load_options(),
        out_dir: args.output.clone(),
        home: crate::home::kiln_home(),
        verify: !args.no_verify,
        profiles,
        profiles_dir,
        archive: crate::packages::ArchiveOptions::from_env(),
    };
    let display = StageDisplay::new(quiet, args.json);
    let report = if args.no_bus {
        let observe = |stage: crate::bus::Stage, note: crate::pipeline::build::StageNote| {
            let stage = stage.name();
            /// A note and its stage, as `--json` prints it on stderr.
            #[derive(serde::Serialize)]
            struct Noted<'a> {
                stage: &'a str,
                #[serde(flatten)]
                note: &'a crate::pipeline::build::StageNote,
            }
            let json = || serde_json::to_value(Noted { stage, note: &note }).unwrap_or_default();
            display.note(stage, &note, json);
        };
        build(&opts, &observe)?
    } else {
        let target = match &args.nats {
            None => BusTarget::Private,
            Some(url) => BusTarget::Remote(Box::new(args.auth.connect_options(url))),
        };
        let rt = runtime()?;
        let observe = |e: &crate::bus::StageEvent| display.event(e);
        let interrupted = async {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                },
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        let result = rt.block_on(build_over_bus(&opts, &target, &observe, interrupted));
        // A stage still running (after Ctrl-C) is abandoned, not waited for.
        rt.shutdown_timeout(std::time::Duration::from_secs(2));
        result?.1
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(0);
    }
    writeln!(out, "image   {}", report.image.display())?;
    writeln!(out, "digest  {}", report.image_digest)?;
    writeln!(
        out,
        "size    {} MiB disk, {} MiB file ({})",
        report.disk_size >> 20,
        report.file_size >> 20,
        report.format
    )?;
    writeln!(
        out,
        "kernel  {} ({} modules in the initramfs)",
        report.kernel_version,
        report.modules.len()
    )?;
    let stages: Vec<String> = report
        .stages
        .iter()
        .map(|s| format!("{} {} {:.2}s", s.stage, s.cache, s.seconds))
        .collect();
    writeln!(out, "stages  {}", stages.join(", "))?;
    if report.boots.is_empty() {
        writeln!(out, "boot    not verified (--no-verify)")?;
    }
    for b in &report.boots {
        writeln!(
            out,
            "boot    {} ({}): marker after {:.2} s{}{}",
            b.profile,
            b.accel,
            b.time_to_marker,
            b.time_to_kernel
                .map(|k| format!(", kernel after {k:.2} s"))
                .unwrap_or_default(),
            b.serial_log
                .as_ref()
                .map(|l| format!(", serial log {}", l.display()))
                .unwrap_or_default()
        )?;
    }
    writeln!(
        out,
        "total   {:.2} s, {} mirror requests",
        report.seconds, report.mirror_requests
    )?;
    Ok(0)
}

fn boot(args: BootArgs) -> anyhow::Result<i32> {
    use crate::verify::{BootImageOptions, boot_image};
    // The operator may name a profile file here; requests and recipes only name profiles.
    let (dir, name) = crate::verify::ProfileDir::split_path(&args.profile);
    let mut opts = BootImageOptions::new(
        name,
        args.expect.clone(),
        std::time::Duration::from_secs(args.timeout),
    );
    opts.profiles_dir = dir.or_else(|| args.profiles.clone());
    opts.kernel = args.kernel.clone();
    opts.initrd = args.initrd.clone();
    opts.cmdline = args.cmdline.clone();
    opts.serial_log = args.serial_log.clone();
    opts.accel = match args.accel.as_deref() {
        Some("kvm") => Some(crate::verify::accel::Accel::Kvm),
        Some("tcg") => Some(crate::verify::accel::Accel::Tcg),
        _ => None,
    };
    let report = boot_image(&args.image, &opts)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        /// The report and the image it booted.
        #[derive(serde::Serialize)]
        struct Booted<'a> {
            image: &'a std::path::Path,
            #[serde(flatten)]
            report: &'a crate::verify::BootReport,
        }
        let booted = Booted {
            image: &args.image,
            report: &report,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&booted)?)?;
    } else {
        writeln!(out, "{report}")?;
    }
    Ok(0)
}

/// How every command ends in failure: the error printed once ([`print_error`]) and the exit
/// code it means ([`exit_code`]). A reader that went away (`kiln render … | head`) is not an
/// error worth a message.
pub fn fail(err: &anyhow::Error) -> i32 {
    let broken_pipe = err
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
    if broken_pipe {
        return 0;
    }
    print_error(err);
    exit_code(err)
}

/// Print a command's error on stderr: `error: <what failed>`, then each cause once,
/// `  caused by: <cause>`. A recipe diagnostic is its own report (the source line, a caret, the
/// help), and a stage's `failed` message prints with its detail.
pub fn print_error(err: &anyhow::Error) {
    use crate::pipeline::build::BuildError;
    use crate::pipeline::bus_build::BusBuildError;
    if let Some(d) = err.downcast_ref::<Diagnostic>() {
        return report(d);
    }
    if let Some(BuildError::Recipe(d)) = err.downcast_ref::<BuildError>() {
        return report(d);
    }
    match err.downcast_ref::<BusBuildError>() {
        Some(BusBuildError::Deliver(BuildError::Recipe(d))) => return report(d),
        Some(BusBuildError::Failed { error, .. }) => return report_failure(error),
        _ => {}
    }
    let chain = crate::error::chain(err.as_ref());
    let mut lines = chain.iter();
    if let Some(top) = lines.next() {
        eprintln!("error: {top}");
    }
    for cause in lines {
        eprintln!("  caused by: {cause}");
    }
}

/// The exit code an error means: [`EXIT_RECIPE`] when the user's input is at fault,
/// [`EXIT_INTERRUPTED`] when the command was stopped, else [`EXIT_FAILURE`]. The outermost error
/// that knows decides.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    use crate::pipeline::build::BuildError;
    use crate::pipeline::bus_build::BusBuildError;
    use crate::pipeline::stages::StageError;
    let input = |yes: bool| if yes { EXIT_RECIPE } else { EXIT_FAILURE };
    for e in err.chain() {
        if e.is::<BadInput>() || e.is::<Diagnostic>() {
            return EXIT_RECIPE;
        }
        if let Some(e) = e.downcast_ref::<BusBuildError>() {
            return match e {
                BusBuildError::Interrupted(_) => EXIT_INTERRUPTED,
                e => input(e.is_input_error()),
            };
        }
        if let Some(e) = e.downcast_ref::<BuildError>() {
            return input(e.is_input_error());
        }
        if let Some(e) = e.downcast_ref::<StageError>() {
            return input(e.is_input_error());
        }
        // `kiln boot`: the machine profile the operator named.
        if let Some(e) = e.downcast_ref::<crate::verify::VerifyError>() {
            use crate::verify::VerifyError as V;
            return input(matches!(
                e,
                V::ProfileName { .. }
                    | V::ProfileNotFound { .. }
                    | V::ProfileParse { .. }
                    | V::ProfileInvalid { .. }
            ));
        }
    }
    EXIT_FAILURE
}

fn keygen(output: &std::path::Path, kind: crate::store::KeyType) -> anyhow::Result<i32> {
    match crate::store::keygen_files(output, kind) {
        Ok(key) => {
            println!(
                "{kind} secret key {} (keep it private), public key {}.pub, key id {}",
                output.display(),
                output.display(),
                crate::store::sign::key_id(&key)
            );
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

fn secure_boot_keygen(output: &std::path::Path, name: &str) -> anyhow::Result<i32> {
    let key = crate::secureboot::keygen(output, name).map_err(BadInput::error)?;
    println!(
        "Secure Boot key {} (RSA 2048, keep it private), certificate {} (CN {name:?}, {})",
        output.display(),
        crate::secureboot::cert_path_of(output).display(),
        key.fingerprint()
    );
    Ok(0)
}

fn verify_image(args: VerifyArgs) -> anyhow::Result<i32> {
    let key = crate::store::load_verifying_key(&args.key).map_err(BadInput::error)?;
    let opts = crate::store::StoreOptions {
        insecure: args.insecure,
        credentials: None,
        signed_for: args.signed_for.clone(),
        ..Default::default()
    };
    let verifiers = args
        .verifier_key
        .iter()
        .map(|p| crate::store::load_verifying_key(p).map_err(BadInput::error))
        .collect::<Result<Vec<_>, _>>()?;
    let require: Vec<crate::store::Requirement> = if !args.require.is_empty() {
        args.require.clone()
    } else {
        crate::store::Requirement::ALL
            .into_iter()
            .filter(|r| *r != crate::store::Requirement::Boot || !verifiers.is_empty())
            .collect()
    };
    let report = crate::store::verify_image(&args.reference, &key, &verifiers, &require, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} (key {})", report.reference, report.key);
        for c in &report.checks {
            let mark = match (c.status, c.required) {
                ("verified", _) => "ok  ",
                (_, true) => "FAIL",
                (_, false) => "--  ",
            };
            println!(
                "  {mark} {:<10} {:<10} {}",
                c.what.to_string(),
                c.status,
                c.detail
            );
        }
    }
    if report.ok {
        Ok(0)
    } else {
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter(|c| c.required && c.status != "verified")
            .map(|c| format!("{} {}", c.what, c.status))
            .collect();
        anyhow::bail!(
            "{} does not meet --require: {}",
            report.reference,
            failed.join(", ")
        )
    }
}

fn sbom(args: SbomArgs) -> anyhow::Result<i32> {
    use crate::store::Requirement;
    let image = Path::new(&args.reference);
    if image.is_file() {
        let doc = local_sbom(image).map_err(BadInput::Message)?;
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    let Some(key) = &args.key else {
        return Err(BadInput::Message(format!(
            "{} is not a file here, so it is read as a registry reference, and the SBOM of a \
             published image is read from its signed attestation: give --key KEYFILE.pub",
            args.reference
        ))
        .into());
    };
    let key = crate::store::load_verifying_key(key).map_err(BadInput::error)?;
    let opts = crate::store::StoreOptions {
        insecure: args.insecure,
        credentials: None,
        ..Default::default()
    };
    let report =
        crate::store::verify_image(&args.reference, &key, &[], &[Requirement::Sbom], &opts)?;
    match report.sbom {
        Some(doc) => {
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(0)
        }
        None => {
            let why = report
                .checks
                .iter()
                .find(|c| c.what == Requirement::Sbom)
                .map(|c| c.detail.clone())
                .unwrap_or_default();
            anyhow::bail!(
                "no SBOM of {} verifies with the key: {why}",
                report.reference
            )
        }
    }
}

/// Largest SBOM file read beside an image.
const MAX_LOCAL_SBOM: u64 = 64 << 20;

/// The SBOM `kiln build` wrote beside `image`, refused unless it describes this very file.
fn local_sbom(image: &Path) -> Result<serde_json::Value, String> {
    use std::io::Read;
    let mut name = image.as_os_str().to_os_string();
    name.push(".spdx.json");
    let path = PathBuf::from(name);
    let file = std::fs::File::open(&path).map_err(|e| {
        format!(
            "{} has no SBOM beside it ({}: {e}); kiln build writes one next to the image it \
             delivers; for a published image give its reference and --key",
            image.display(),
            path.display()
        )
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_LOCAL_SBOM + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_LOCAL_SBOM {
        return Err(format!(
            "{} is larger than {} MiB: not an SBOM kiln wrote",
            path.display(),
            MAX_LOCAL_SBOM >> 20
        ));
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let described = doc["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["SPDXID"] == "SPDXRef-Image"))
        .and_then(|p| p["checksums"].as_array())
        .and_then(|c| c.iter().find(|c| c["algorithm"] == "SHA256"))
        .and_then(|c| c["checksumValue"].as_str())
        .ok_or_else(|| {
            format!(
                "{} names no image (no SPDXRef-Image package with a SHA256)",
                path.display()
            )
        })?;
    let mut f =
        std::fs::File::open(image).map_err(|e| format!("reading {}: {e}", image.display()))?;
    let (actual, _) = crate::digest::hash_file(&mut f)
        .map_err(|e| format!("reading {}: {e}", image.display()))?;
    if actual.hex() != described {
        return Err(format!(
            "{} describes the image sha256:{described}, but {} is {actual}: it is another \
             build's SBOM, or the image changed after kiln build delivered it",
            path.display(),
            image.display()
        ));
    }
    Ok(doc)
}

fn sign(args: SignArgs) -> anyhow::Result<i32> {
    let key = crate::store::load_signing_key(&args.key).map_err(BadInput::error)?;
    let opts = crate::store::StoreOptions {
        insecure: args.insecure,
        credentials: None,
        ..Default::default()
    };
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let r = crate::store::sign_image(&args.reference, &key, epoch, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} signed with {} key {} (signature manifest {})",
            r.reference, r.key_type, r.key, r.signature_digest
        );
    }
    Ok(0)
}

/// `kiln promote`: check the image, tag it as the channel, announce it.
fn promote(args: PromoteArgs) -> anyhow::Result<i32> {
    use crate::store::{Location, Reference, Requirement, StoreOptions, load_verifying_key};
    let trust = load_verifying_key(&args.trust)
        .map_err(|e| anyhow::Error::new(BadInput::error(e)).context("--trust"))?;
    let verifiers = args
        .trust_verifier
        .iter()
        .map(|p| load_verifying_key(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::Error::new(BadInput::error(e)).context("--trust-verifier"))?;
    let r = Reference::parse(&args.reference).map_err(BadInput::error)?;
    let (Location::Registry { host, repository }, Some(_)) = (&r.location, &r.digest) else {
        return Err(BadInput::Message(format!(
            "{}: give the image in a registry by digest (host:port/repository@sha256:…, as `kiln \
             images` lists it): a tag can move between the checks and the promotion",
            args.reference
        ))
        .into());
    };
    let repository = format!("{host}/{repository}");
    let opts = StoreOptions {
        insecure: args.insecure,
        ..Default::default()
    };
    let required = [Requirement::Signature, Requirement::Boot];
    let report = crate::store::verify_image(&args.reference, &trust, &verifiers, &required, &opts)?;
    if !report.ok {
        let why: Vec<String> = report
            .checks
            .iter()
            .filter(|c| c.required && c.status != "verified")
            .map(|c| format!("{} is {}: {}", c.what, c.status, c.detail))
            .collect();
        return Err(BadInput::Message(format!(
            "refused to promote {} to {}: {}; nothing moved",
            report.reference,
            args.channel,
            why.join("; ")
        ))
        .into());
    }
    let promoted = crate::store::tag_image(&report.reference, &args.channel, &opts)?;
    let user = user_name();
    let message = crate::bus::ImagePublished {
        v: crate::bus::VERSION,
        build: String::new(),
        repository,
        reference: promoted.clone(),
        digest: report.manifest_digest.to_string(),
        tags: vec![args.channel.clone()],
        signature: None,
        verification: serde_json::json!({ "checks": report.checks }),
        promotion: Some(crate::bus::Promotion {
            channel: args.channel.clone(),
            by: format!("{user}@{}", crate::pipeline::worker::host_name()),
            from: report.reference.clone(),
        }),
        time: crate::bus::EventTime::now(),
    };
    let sequence = runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        bus.publish_image(&message).await
    })?;
    if args.json {
        let doc = serde_json::json!({ "promoted": promoted, "announcement": message, "sequence": sequence });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "{} is now {} (signature and boot attestation verified; announced to the agents following {}:{})",
            report.reference, promoted, message.repository, args.channel
        );
    }
    Ok(0)
}

/// `kiln revoke`: store the revocation in the registry, then announce it to the agents.
fn revoke(args: RevokeArgs) -> anyhow::Result<i32> {
    use crate::store::{Location, Reference, StoreOptions};
    let r = Reference::parse(&args.reference).map_err(BadInput::error)?;
    let (Location::Registry { host, repository }, Some(digest)) = (&r.location, &r.digest) else {
        return Err(BadInput::Message(format!(
            "{}: give the image in a registry by digest (host:port/repository@sha256:…): a tag \
             names whatever it points at now",
            args.reference
        ))
        .into());
    };
    if args.reason.trim().is_empty() {
        return Err(BadInput::Message("--reason: say why the image is revoked".into()).into());
    }
    let opts = StoreOptions {
        insecure: args.insecure,
        ..Default::default()
    };
    let by = format!("{}@{}", user_name(), crate::pipeline::worker::host_name());
    let reference = crate::store::revoke_image(&args.reference, &args.reason, &by, &opts)?;
    let message = crate::bus::ImageRevoked {
        v: crate::bus::VERSION,
        repository: format!("{host}/{repository}"),
        reference: reference.clone(),
        digest: digest.to_string(),
        reason: args.reason.clone(),
        by,
        time: crate::bus::EventTime::now(),
    };
    let sequence = runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        bus.publish_raw(message.subject(), crate::bus::encode(&message))
            .await
    })?;
    if args.json {
        let doc = serde_json::json!({ "revoked": reference, "announcement": message, "sequence": sequence });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "{reference} is revoked ({}); agents running it go back to the image before it",
            args.reason
        );
    }
    Ok(0)
}

/// Who runs this command, for the records of promotions, rollouts and revocations.
fn user_name() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn publish(args: PublishArgs) -> anyhow::Result<i32> {
    use crate::store::{PublishMeta, StoreOptions, load_signing_key};
    let key = match &args.key {
        Some(path) => match load_signing_key(path) {
            Ok(k) => Some(k),
            Err(e) => return Err(BadInput::error(e).into()),
        },
        None => {
            tracing::warn!(
                "no --key: publishing unsigned; agents and `kiln pull --trust` refuse it"
            );
            None
        }
    };
    let meta = PublishMeta {
        recipe: args.recipe.clone().unwrap_or_else(|| {
            args.image
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        }),
        source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        extra_tags: args.tag.clone(),
        ..PublishMeta::default()
    };
    let opts = StoreOptions {
        insecure: args.insecure,
        credentials: None,
        ..Default::default()
    };
    match crate::store::publish(&args.image, &args.to, &meta, key.as_ref(), &opts) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} ({} MiB, {} MiB uploaded, {:.2} s){}",
                    r.reference,
                    r.bytes >> 20,
                    r.uploaded >> 20,
                    r.seconds,
                    if r.signature_digest.is_some() {
                        ", signed"
                    } else {
                        ", unsigned"
                    }
                );
                println!(
                    "  {} chunks ({} different): {} in the images the tags pointed at, {} new (what a host running one of those fetches)",
                    r.chunks.chunks,
                    r.chunks.unique,
                    crate::gc::human_bytes(r.chunks.known_bytes),
                    crate::gc::human_bytes(r.chunks.new_bytes),
                );
            }
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

fn pull(args: PullArgs) -> anyhow::Result<i32> {
    use crate::store::{StoreOptions, load_verifying_key};
    let trust = match &args.trust {
        Some(path) => match load_verifying_key(path) {
            Ok(k) => Some(k),
            Err(e) => return Err(BadInput::error(e).into()),
        },
        None => None,
    };
    let opts = StoreOptions {
        insecure: args.insecure,
        credentials: None,
        signed_for: args.signed_for.clone(),
        ..Default::default()
    };
    for seed in &args.seed {
        if !seed.is_file() {
            return Err(BadInput::Message(format!(
                "--seed {}: no such file; give an image pulled or built before",
                seed.display()
            ))
            .into());
        }
    }
    match crate::store::pull_seeded(
        &args.reference,
        &args.output,
        trust.as_ref(),
        &args.seed,
        &opts,
    ) {
        Ok(r) => {
            if args.json {
                /// The report and where it went.
                #[derive(serde::Serialize)]
                struct Pulled<'a> {
                    #[serde(flatten)]
                    report: &'a crate::store::PullReport,
                    output: &'a std::path::Path,
                }
                let pulled = Pulled {
                    report: &r,
                    output: &args.output,
                };
                println!("{}", serde_json::to_string_pretty(&pulled)?);
            } else {
                println!(
                    "{} -> {} ({} MiB, {:.2} s, {})",
                    r.reference,
                    args.output.display(),
                    r.bytes >> 20,
                    r.seconds,
                    r.signature
                );
                if let Some(d) = &r.delta {
                    println!(
                        "  {} chunks: {} fetched ({}), {} from the seeds ({}), {} kept from before ({}), {} of zeros",
                        d.chunks,
                        d.fetched_chunks,
                        crate::gc::human_bytes(d.fetched_bytes),
                        d.reused_chunks,
                        crate::gc::human_bytes(d.reused_bytes),
                        d.resumed_chunks,
                        crate::gc::human_bytes(d.resumed_bytes),
                        crate::gc::human_bytes(d.zero_bytes),
                    );
                }
            }
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

fn images(target: &str, insecure: bool, json: bool) -> anyhow::Result<i32> {
    let opts = crate::store::StoreOptions {
        insecure,
        credentials: None,
        ..Default::default()
    };
    match crate::store::images(target, &opts) {
        Ok(list) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for i in &list {
                    println!(
                        "{}:{}  {}  {} MiB  {}  {}{}",
                        i.repository,
                        i.tag,
                        i.manifest_digest,
                        i.size >> 20,
                        i.format.as_deref().unwrap_or("-"),
                        i.created.as_deref().unwrap_or("-"),
                        if i.signed { "  signed" } else { "" }
                    );
                }
            }
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stopping workers");
}

fn run_workers(
    nats: &NatsOpts,
    replicas: &ReplicaOpts,
    retry: &RetryOpts,
    stages: Vec<crate::bus::Stage>,
    mut config: crate::pipeline::worker::WorkerConfig,
    api: Option<ApiSetup>,
    with_controller: bool,
) -> anyhow::Result<i32> {
    use crate::pipeline::worker::run_workers;
    let stages = if stages.is_empty() {
        crate::bus::Stage::ALL.to_vec()
    } else {
        stages
    };
    config.policy = retry.policy();
    let rt = runtime()?;
    let done = rt.block_on(async {
        let bus = crate::bus::Bus::connect(&nats.creating(replicas)).await?;
        let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
        tracing::info!(
            "worker {} running stages {} against {}",
            config.name,
            names.join(","),
            redact(&nats.url)
        );
        // One shutdown signal stops both the workers and the API.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let mut server = None;
        if let Some(api) = api {
            bus.ensure_kiln_stream().await?;
            match tokio::net::TcpListener::bind(api.listen).await {
                Ok(listener) => {
                    let local = listener.local_addr()?;
                    let limits = api.config.limits.clone();
                    let router = crate::api::router(bus.clone(), api.config);
                    let shutdown = stopped(stop_rx.clone());
                    server = Some(tokio::spawn(crate::api::serve(
                        listener, router, limits, shutdown,
                    )));
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "kiln api listening on http://{local}")?;
                    out.flush()?;
                }
                Err(e) if api.explicit => anyhow::bail!(
                    "cannot listen on {} for the API: {e} (is the port taken? choose another with --listen ADDR, or --listen none)",
                    api.listen
                ),
                Err(e) => tracing::warn!(
                    "no HTTP API: cannot listen on {}: {e}; the workers run without it (choose an address with --listen ADDR, or --listen none)",
                    api.listen
                ),
            }
        }
        if with_controller {
            let (bus, name, stop) = (bus.clone(), config.name.clone(), stopped(stop_rx.clone()));
            tokio::spawn(async move {
                if let Err(e) = crate::rollout::run(&bus, &name, stop).await {
                    tracing::warn!("rollout controller stopped: {}", crate::error::Chain(&e));
                }
            });
        }
        run_workers(&bus, &stages, config, stopped(stop_rx)).await?;
        if let Some(server) = server {
            // Open event streams of running builds would hold a graceful shutdown forever.
            let abort = server.abort_handle();
            match tokio::time::timeout(std::time::Duration::from_secs(5), server).await {
                Ok(joined) => joined??,
                Err(_) => {
                    tracing::info!("closing the API's open event streams");
                    abort.abort();
                }
            }
        }
        Ok(0)
    });
    // A stage abandoned at shutdown may still run on a blocking thread (a boot, a render):
    // do not wait for it. QEMU dies with this process (PR_SET_PDEATHSIG).
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    done
}

/// The API part of `kiln up`.
struct ApiSetup {
    listen: std::net::SocketAddr,
    /// Given with --listen: failing to listen is an error (else a warning).
    explicit: bool,
    config: crate::api::ApiConfig,
}

/// Read `kiln up`'s API options: None for `--listen none`.
fn api_setup(args: &UpArgs) -> anyhow::Result<Option<ApiSetup>> {
    use anyhow::Context;
    let text = args.listen.as_deref().unwrap_or(crate::api::DEFAULT_LISTEN);
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let listen: std::net::SocketAddr = text.parse().map_err(|_| {
        BadInput::Message(format!(
            "--listen {text:?} is not an address: give IP:PORT (e.g. 127.0.0.1:7070, [::1]:7070) or `none`"
        ))
    })?;
    if !listen.ip().is_loopback() {
        tracing::warn!(
            "the API listens on {listen}, not only on loopback: anyone who reaches it can read build status (POSTs still need the token); put it behind a firewall or a TLS proxy"
        );
    }
    let home = crate::home::kiln_home();
    let env = std::env::var("KILN_API_TOKEN").ok();
    let (token, origin) =
        crate::api::load_token(args.token_file.as_deref(), env, &home).map_err(BadInput::error)?;
    match origin {
        crate::api::TokenOrigin::Generated(path) => {
            eprintln!("kiln: API token in {}", path.display())
        }
        crate::api::TokenOrigin::File(path) => {
            tracing::info!("API token from {}", path.display())
        }
        crate::api::TokenOrigin::Environment => tracing::info!("API token from $KILN_API_TOKEN"),
    }
    let secret = match &args.hook_secret_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(BadInput::error)
                .with_context(|| format!("cannot read the hook secret file {}", path.display()))?;
            let secret = text.trim().as_bytes().to_vec();
            if secret.is_empty() {
                return Err(BadInput::Message(format!(
                    "hook secret file {} is empty",
                    path.display()
                ))
                .into());
            }
            Some(secret)
        }
        None => None,
    };
    glob::Pattern::new(&args.hook_recipes).map_err(|e| {
        BadInput::Message(format!(
            "--hook-recipes {:?} is not a valid glob: {}; write e.g. recipes/*.yaml",
            args.hook_recipes, e.msg
        ))
    })?;
    Ok(Some(ApiSetup {
        listen,
        explicit: args.listen.is_some(),
        config: crate::api::ApiConfig {
            token,
            hook: crate::api::HookConfig {
                repos: args.hook_repos.clone(),
                recipes: args.hook_recipes.clone(),
                secret,
                home,
            },
            limits: crate::api::Limits {
                read_timeout: std::time::Duration::from_secs_f64(args.api_read_timeout),
                ..crate::api::Limits::default()
            },
            trust: None,
        },
    }))
}

/// Input the user gave is at fault (an argument, a file they named): exit code 2.
#[derive(Debug, thiserror::Error)]
enum BadInput {
    #[error("{0}")]
    Message(String),
    /// A library error about that input, shown as it is (its causes stay its causes).
    #[error(transparent)]
    Error(Box<dyn std::error::Error + Send + Sync>),
}

impl BadInput {
    fn error(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        BadInput::Error(Box::new(e))
    }
}

fn nats_up(args: UpArgs) -> anyhow::Result<i32> {
    let mut api = api_setup(&args)?;
    let mut config = worker_config(
        &args.access,
        &args.limits,
        &args.hook_repos,
        args.profiles.clone(),
        &args.publish,
    )?;
    config.cache_max = args.cache_max;
    // The dashboard checks published images with the keys they are signed with.
    if let (Some(api), Some(publish), Some(verifier)) =
        (api.as_mut(), &config.publish, &config.verifier)
        && let Some(key) = &publish.key
    {
        let key = crate::store::load_signing_key(key).map_err(BadInput::error)?;
        api.config.trust = Some(crate::api::Trust {
            key: key.verifying_key(),
            verifiers: vec![verifier.verifying_key()],
            store: publish.store.clone(),
        });
    }
    run_workers(
        &args.nats,
        &args.replicas,
        &args.retry,
        Vec::new(),
        config,
        api,
        !args.no_controller,
    )
}

fn nats_worker(args: WorkerArgs) -> anyhow::Result<i32> {
    let mut config = worker_config(
        &args.access,
        &args.limits,
        &[],
        args.profiles.clone(),
        &args.publish,
    )?;
    config.cache_max = args.cache_max;
    run_workers(
        &args.nats,
        &args.replicas,
        &args.retry,
        args.stages,
        config,
        None,
        false,
    )
}

/// The configuration of this process's workers from their flags.
fn worker_config(
    access: &AccessOpts,
    limits: &LimitOpts,
    extra_git: &[String],
    profiles: Option<PathBuf>,
    publish: &PublishOpts,
) -> Result<crate::pipeline::worker::WorkerConfig, BadInput> {
    let mut config = crate::pipeline::worker::WorkerConfig::from_env();
    config.access = access.access(extra_git)?;
    config.limits = limits.limits();
    config.profiles_dir = profiles;
    config.publish = publish.target();
    config.verifier = Some(verifier_key(publish.verifier_key.as_deref(), &config.home)?);
    if let Some(path) = &publish.secure_boot_key {
        // Refused now, not at the first Secure Boot build.
        crate::secureboot::SecureBootKey::load(path, &crate::secureboot::cert_path_of(path))
            .map_err(BadInput::error)?;
        config.secure_boot_key = Some(path.clone());
    }
    Ok(config)
}

/// The verify stage's signing key: the file given, else `$KILN_HOME/verifier.key`, made (ECDSA
/// P-256) when absent.
fn verifier_key(
    given: Option<&std::path::Path>,
    home: &std::path::Path,
) -> Result<crate::store::SigningKey, BadInput> {
    use crate::store::{KeyType, keygen, load_signing_key};
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let p = home.join("verifier.key");
            if !p.exists() {
                std::fs::create_dir_all(home).map_err(|e| {
                    BadInput::Message(format!("cannot create {}: {e}", home.display()))
                })?;
                keygen(&p, KeyType::EcdsaP256).map_err(BadInput::error)?;
                tracing::info!(
                    "made the verifier key {} (agents trust {}.pub with --trust-verifier)",
                    p.display(),
                    p.display()
                );
            }
            p
        }
    };
    load_signing_key(&path).map_err(BadInput::error)
}

fn watch(args: WatchArgs) -> anyhow::Result<i32> {
    use crate::watch::{Watcher, state_file_for};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(BadInput::Message(format!(
            "--interval {} must be a positive number of seconds",
            args.interval
        ))
        .into());
    }
    let source = crate::source::GitMirror::new(&args.repo).map_err(BadInput::error)?;
    let url = source.url().to_string();
    let state = args.state.clone().unwrap_or_else(|| {
        state_file_for(
            &crate::home::kiln_home().join("watch"),
            &url,
            &args.git_ref,
            &args.recipes,
        )
    });
    let mut watcher = Watcher::with_source(source, &args.git_ref, &args.recipes, &state)
        .map_err(BadInput::error)?;
    let rt = runtime()?;
    let bus = rt.block_on(crate::bus::Bus::connect(&args.nats.connect_options()))?;
    rt.block_on(bus.kiln_stream())?;
    if args.baseline && watcher.state().commit.is_none() {
        watcher.baseline(&args.git_ref)?;
        if let Some(c) = &watcher.state().commit {
            tracing::info!("watch {} {}: baseline at {c}", redact(&url), args.git_ref);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        rt.spawn(async move {
            shutdown_signal().await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    // The requester is recorded in every message of the build: no credentials in it.
    let requester = format!("git:{}", redact(&url));
    let mut publish = |t: &crate::watch::Trigger| -> anyhow::Result<()> {
        let mut req = t.build_request(&url, requester.clone());
        let id = crate::bus::new_build_id();
        req.id = Some(id.clone());
        req.params = args.set.iter().cloned().collect();
        req.profiles = args.profile.clone();
        req.verify = !args.no_verify;
        rt.block_on(bus.publish_request(&req))?;
        let mut out = std::io::stdout().lock();
        if args.json {
            let line = serde_json::json!({
                "build": id,
                "recipe": t.recipe_path,
                "commit": t.commit,
                "ref": t.reference,
                "repo": redact(&url),
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{id} {} {}", t.recipe_path, t.commit)?;
        }
        out.flush()?;
        Ok(())
    };
    if args.once {
        watcher.deliver(None, &mut publish)?;
        return Ok(0);
    }
    let interval = std::time::Duration::from_secs_f64(args.interval);
    tracing::info!(
        "watching {} {} for {} every {:.1} s",
        redact(&url),
        args.git_ref,
        args.recipes,
        args.interval
    );
    while !stop.load(Ordering::SeqCst) {
        let started = std::time::Instant::now();
        if let Err(e) = watcher.deliver(None, &mut publish) {
            tracing::warn!("watch {} {}: {e:#}", redact(&url), args.git_ref);
        }
        while !stop.load(Ordering::SeqCst) && started.elapsed() < interval {
            let left = interval.saturating_sub(started.elapsed());
            std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
        }
    }
    Ok(0)
}

/// One stage event on stdout, for `kiln logs` and `kiln submit --follow`: a JSON object with
/// `--json`, else a line (time, stage, event, worker, cache, duration, progress or the error)
/// and, for a failure, its whole report indented (source line and caret, a boot's serial tail).
fn print_event(event: &crate::bus::StageEvent, json: bool) -> anyhow::Result<()> {
    use crate::bus::StageEvent;
    use crate::pipeline::events::{event_json, event_line};
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", event_json(event))?;
    } else {
        writeln!(out, "{}", event_line(event))?;
        if let StageEvent::Failed(f) = event
            && let Some(detail) = &f.error.detail
        {
            for l in detail.lines() {
                writeln!(out, "    | {l}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn nats_submit(args: SubmitArgs) -> anyhow::Result<i32> {
    use crate::bus::{BuildRequest, RecipeSource, StageEvent};
    use crate::pipeline::events::ends_build;
    use futures::StreamExt;
    let recipe = match (&args.git, &args.recipe) {
        (Some(url), _) => {
            let path = args
                .path
                .clone()
                .or_else(|| args.recipe.as_ref().map(|p| p.display().to_string()))
                .ok_or_else(|| {
                    BadInput::Message("--git needs --path (the recipe in the repository)".into())
                })?;
            RecipeSource::Git {
                git: crate::bus::GitSource {
                    url: url.clone(),
                    git_ref: args.git_ref.clone().unwrap_or_default(),
                    path,
                },
            }
        }
        (None, Some(path)) => RecipeSource::Path {
            path: std::path::absolute(path)?,
        },
        (None, None) => {
            return Err(BadInput::Message(
                "give a recipe file, or --git URL --ref REF --path FILE".into(),
            )
            .into());
        }
    };
    let requester = std::env::var("USER").unwrap_or_else(|_| "kiln submit".into());
    let mut req = BuildRequest::new(recipe, requester);
    let id = args.id.clone().unwrap_or_else(crate::bus::new_build_id);
    req.id = Some(id.clone());
    req.params = args.set.iter().cloned().collect();
    req.profiles = args.profile.clone();
    req.verify = !args.no_verify;
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        bus.kiln_stream().await?;
        bus.publish_request(&req).await?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", serde_json::json!({ "build": id }))?;
        } else {
            writeln!(out, "{id}")?;
        }
        out.flush()?;
        drop(out);
        if !args.follow {
            return Ok(0);
        }
        let follow = async {
            let events = bus.follow(&id, true).await?;
            tokio::pin!(events);
            while let Some(ev) = events.next().await {
                let ev = ev?;
                let Ok(event) = ev.event else { continue };
                print_event(&event, args.json)?;
                if ends_build(&event) {
                    return Ok(if matches!(event, StageEvent::Failed(_)) {
                        EXIT_FAILURE
                    } else {
                        0
                    });
                }
            }
            anyhow::bail!("the event stream of build {id} ended")
        };
        let Some(seconds) = args.timeout else {
            return follow.await;
        };
        match tokio::time::timeout(std::time::Duration::from_secs(seconds), follow).await {
            Ok(code) => code,
            Err(_) => anyhow::bail!(
                "build {id} did not end within --timeout {seconds} s; it goes on without this \
                 command: `kiln status {id}` shows where it is, `kiln logs {id} --follow` follows it"
            ),
        }
    })
}

/// `IP:PORT`, or a port alone on loopback.
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.trim().parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.trim().parse().map_err(|_| {
        format!("{s:?} is not an address: give IP:PORT (e.g. 127.0.0.1:9464) or a port")
    })
}

/// Serve `GET /metrics` (this process's metrics only) on `addr` until the process ends.
async fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        BadInput::Message(format!(
            "cannot listen on {addr} for --metrics: {e} (is the port taken?)"
        ))
    })?;
    let router = axum::Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    crate::metrics::CONTENT_TYPE,
                )],
                crate::metrics::global().render(&[]),
            )
        }),
    );
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    tokio::spawn(crate::api::serve(
        listener,
        router,
        crate::api::Limits::default(),
        std::future::pending(),
    ));
    Ok(())
}

fn agent(args: AgentArgs) -> anyhow::Result<i32> {
    use crate::agent::{AgentConfig, AgentEvent, parse_watch};
    let (repository, tag) = parse_watch(&args.watch).map_err(BadInput::error)?;
    if let Err(e) = crate::store::load_verifying_key(&args.trust) {
        return Err(anyhow::Error::new(BadInput::error(e)).context("--trust"));
    }
    for path in &args.trust_verifier {
        if let Err(e) = crate::store::load_verifying_key(path) {
            return Err(anyhow::Error::new(BadInput::error(e)).context("--trust-verifier"));
        }
    }
    if args.require.contains(&crate::store::Requirement::Boot) && args.trust_verifier.is_empty() {
        return Err(BadInput::Message(
            "a boot attestation is required (--require includes boot, the default) but no \
             --trust-verifier KEYFILE is given: give the verifier.key.pub of the workers that \
             boot images, or --require signature to run images that carry none"
                .into(),
        )
        .into());
    }
    let config = AgentConfig {
        name: args.name.clone(),
        repository,
        tag,
        trust: args.trust.clone(),
        trust_verifiers: args.trust_verifier.clone(),
        require: args.require.clone(),
        state_dir: std::path::absolute(&args.state_dir)?,
        profile: args.profile.clone(),
        profiles_dir: args.profiles.clone(),
        listen: args.listen,
        health_serial: args.health_serial.clone(),
        health_port: args.health_port,
        health_timeout: args.health_timeout,
        store: crate::store::StoreOptions {
            insecure: args.insecure,
            credentials: None,
            signed_for: args.signed_for.clone(),
            ..Default::default()
        },
        groups: args.groups.clone(),
        heartbeat: std::time::Duration::from_secs(args.heartbeat_interval),
        health_interval: std::time::Duration::from_secs(args.health_interval),
        health_retries: args.health_retries,
        keep: args.keep as usize,
    };
    let json = args.json;
    let report: crate::agent::Report = Box::new(move |event: &AgentEvent| {
        let mut out = std::io::stdout().lock();
        let _ = if json {
            match serde_json::to_string(event) {
                Ok(line) => writeln!(out, "{line}"),
                Err(e) => Err(std::io::Error::other(e)),
            }
        } else {
            match event {
                AgentEvent::Ready {
                    agent,
                    watch,
                    running,
                    ..
                } => writeln!(
                    out,
                    "agent {agent} watching {watch}; running {}",
                    running.as_deref().unwrap_or("nothing")
                ),
                AgentEvent::Completed(c) => {
                    writeln!(out, "running {} (QEMU pid {})", c.reference, c.vm["pid"])
                }
                AgentEvent::Failed(f) => {
                    writeln!(out, "failed {}: {}", f.reference, f.error.message)
                }
            }
        };
        let _ = out.flush();
    });
    runtime()?.block_on(async {
        if let Some(addr) = args.metrics {
            serve_metrics(addr).await?;
        }
        let bus = crate::bus::Bus::connect(&args.nats.creating(&args.replicas)).await?;
        crate::agent::run(&bus, config, report, shutdown_signal()).await?;
        Ok(0)
    })
}

fn gc(args: GcArgs, quiet: bool) -> anyhow::Result<i32> {
    use crate::gc::remote::{collect_remote, published_refs};
    use crate::gc::{Policy, collect, human_bytes, render_table};
    let keep = match args.keep_days {
        Some(d) if !(d >= 0.0 && d.is_finite()) => {
            return Err(BadInput::Message(format!(
                "--keep-days {d} must be a number of days, 0 or more"
            ))
            .into());
        }
        Some(d) => Some(std::time::Duration::from_secs_f64(d * 86_400.0)),
        None if args.max_size.is_none() => Some(std::time::Duration::from_secs(30 * 86_400)),
        None => None,
    };
    if !(args.min_age >= 0.0 && args.min_age.is_finite()) {
        return Err(BadInput::Message(format!(
            "--min-age {} must be a number of minutes, 0 or more",
            args.min_age
        ))
        .into());
    }
    let mut policy = Policy {
        keep,
        max_size: args.max_size,
        dry_run: args.dry_run,
        pinned: Default::default(),
    };
    let home = crate::home::kiln_home();
    // Progress on stderr, at most every two seconds.
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let progress = |text: &str| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if !quiet && last.elapsed() >= std::time::Duration::from_secs(2) {
            eprintln!("kiln gc: {text}");
            *last = std::time::Instant::now();
        }
    };
    // With NATS: what published images reference is kept here and in the buckets.
    let rt = runtime()?;
    let bus = match &args.nats {
        Some(url) => {
            let bus = rt.block_on(crate::bus::Bus::connect(&args.auth.connect_options(url)))?;
            policy.pinned = rt.block_on(published_refs(&bus))?;
            Some(bus)
        }
        None => None,
    };
    let local = collect(&home, &policy, &progress)?;
    let remote = match &bus {
        Some(bus) => {
            let min_age = std::time::Duration::from_secs_f64(args.min_age * 60.0);
            let blobs = crate::home::BlobStore::new(&home);
            Some(rt.block_on(collect_remote(bus, blobs, &policy, min_age, &progress))?)
        }
        None => None,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = serde_json::json!({ "local": local, "remote": remote });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        let title = format!("{}:", local.home.display());
        write!(out, "{}", render_table(&title, &local.kinds, args.dry_run))?;
        let verb = if args.dry_run { "would free" } else { "freed" };
        writeln!(
            out,
            "  {verb} {}: {} -> {}",
            human_bytes(local.freed_bytes()),
            human_bytes(local.before_bytes),
            human_bytes(local.after_bytes)
        )?;
        if let Some(r) = &remote {
            let title = format!(
                "NATS buckets ({}):",
                redact(args.nats.as_deref().unwrap_or(""))
            );
            write!(out, "{}", render_table(&title, &r.kinds, args.dry_run))?;
            writeln!(
                out,
                "  object store: {} -> {}",
                human_bytes(r.before_bytes),
                human_bytes(r.after_bytes)
            )?;
        }
    }
    let errors: Vec<&String> = local
        .errors
        .iter()
        .chain(remote.iter().flat_map(|r| r.errors.iter()))
        .collect();
    for e in &errors {
        eprintln!("kiln gc: {e}");
    }
    Ok(if errors.is_empty() { 0 } else { 1 })
}

/// A group name: what a subject token and a KV key may hold, 1 to 64 characters.
fn parse_group(s: &str) -> Result<String, String> {
    crate::bus::agents::valid_group(s)
        .then(|| s.to_string())
        .ok_or_else(|| {
            format!("{s:?}: a group is 1 to 64 letters, digits, `-`, `_` or `.`, e.g. web or eu-1")
        })
}

/// `kiln agents`: the fleet from the kiln-agents bucket.
fn agents(args: AgentsArgs) -> anyhow::Result<i32> {
    use crate::bus::agents::{Inventory, in_group};
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        let now = crate::time::now_ms() as i64;
        let entries = match Inventory::open_existing(&bus).await? {
            Some(inv) => in_group(inv.list(now).await?, args.group.as_deref()),
            None => Vec::new(),
        };
        // Digests revoked within the stream's retention (the registry keeps them for good).
        let revoked: std::collections::BTreeMap<String, String> = bus
            .stored_messages("kiln.image.revoked.>")
            .await?
            .iter()
            .filter_map(|m| crate::bus::decode::<crate::bus::ImageRevoked>(&m.payload).ok())
            .map(|r| (r.digest, r.reason))
            .collect();
        let on_revoked = |e: &crate::bus::agents::AgentEntry| {
            e.heartbeat
                .digest
                .as_ref()
                .and_then(|d| revoked.get(d))
                .cloned()
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            let listed: Vec<serde_json::Value> = entries
                .iter()
                .map(|e| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    if let (Some(why), Some(o)) = (on_revoked(e), v.as_object_mut()) {
                        o.insert("revoked".into(), serde_json::Value::String(why));
                    }
                    v
                })
                .collect();
            let doc = serde_json::json!({ "agents": listed });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        } else if entries.is_empty() {
            writeln!(
                out,
                "no agents{} (each `kiln agent` records itself in the kiln-agents bucket)",
                args.group
                    .as_deref()
                    .map(|g| format!(" in group {g}"))
                    .unwrap_or_default()
            )?;
        } else {
            let age = |s: u64| crate::pipeline::events::age_text(0, s * 1000);
            writeln!(
                out,
                "{:<16} {:<10} {:<16} {:>7} {:>6} IMAGE",
                "AGENT", "STATE", "GROUPS", "UPTIME", "SEEN"
            )?;
            for e in &entries {
                let hb = &e.heartbeat;
                writeln!(
                    out,
                    "{:<16} {:<10} {:<16} {:>7} {:>6} {}",
                    hb.agent,
                    e.state,
                    if hb.groups.is_empty() {
                        "-".to_string()
                    } else {
                        hb.groups.join(",")
                    },
                    hb.uptime_s.map(age).unwrap_or_else(|| "-".into()),
                    age(e.last_seen_s),
                    hb.deploying
                        .as_ref()
                        .map(|d| format!(
                            "{} (deploying {d})",
                            hb.running.as_deref().unwrap_or("-")
                        ))
                        .or_else(|| hb.running.clone())
                        .unwrap_or_else(|| "-".into())
                        + &on_revoked(e)
                            .map(|why| format!(" REVOKED: {why}"))
                            .unwrap_or_default(),
                )?;
            }
        }
        let bad = entries
            .iter()
            .any(|e| e.state == "gone" || e.state == "unhealthy" || on_revoked(e).is_some());
        Ok(if bad { EXIT_FAILURE } else { 0 })
    })
}

fn nats_status(args: StatusArgs) -> anyhow::Result<i32> {
    use crate::bus::status::{BuildState, BuildStatus};
    use crate::pipeline::events::{BuildPhase, age_text};
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        let mut out = std::io::stdout().lock();
        if args.cluster {
            let report = bus.cluster_report().await;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                for line in report.lines() {
                    writeln!(out, "{line}")?;
                }
            }
            // A stream without a leader is what the operator asked about: say it by the exit.
            let healthy = report
                .streams
                .iter()
                .all(|s| s.error.is_none() && s.leader.is_some());
            return Ok(if healthy { 0 } else { EXIT_FAILURE });
        }
        let Some(build) = &args.build else {
            // Recent builds, newest first, from the build index (O(limit), whatever the history).
            let index = crate::bus::BuildIndex::open_existing(&bus).await?;
            let builds = crate::bus::index::recent(&bus, index.as_ref(), args.limit).await?;
            if args.json {
                let doc = serde_json::json!({ "builds": builds });
                writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
                return Ok(0);
            }
            let now = crate::time::now_ms();
            writeln!(
                out,
                "{:<26} {:<9} {:<8} {:>5} {:<14} RECIPE",
                "BUILD", "STATE", "STAGE", "AGE", "REQUESTER"
            )?;
            for b in &builds {
                writeln!(
                    out,
                    "{:<26} {:<9} {:<8} {:>5} {:<14} {}",
                    b.id,
                    b.state.name(),
                    b.stage.map(|s| s.name()).unwrap_or("-"),
                    age_text(b.requested_ms, now),
                    b.requester.as_deref().unwrap_or("-"),
                    b.recipe.as_deref().unwrap_or("-")
                )?;
                if b.state == BuildPhase::Failed
                    && let Some(e) = &b.error
                {
                    writeln!(out, "{:<26} {}", "", crate::pipeline::events::error_text(e))?;
                }
            }
            return Ok(0);
        };
        let events = bus.build_events(build).await?;
        if events.is_empty() {
            anyhow::bail!(
                "no events for build {build} (is the id right? `kiln status` lists builds)"
            );
        }
        let status = BuildStatus::from_events(build, &events);
        let deployments = crate::bus::status::deployments(&bus, build).await?;
        if args.json {
            let doc = crate::bus::status::status_document(&bus, &status, deployments).await?;
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        } else {
            writeln!(out, "build {build}")?;
            for stage in &status.stages {
                writeln!(out, "{}", stage.line())?;
            }
            for d in &deployments {
                let s = |k: &str| d[k].as_str().unwrap_or("-").to_string();
                let what = if s("kind") == "failed" {
                    format!(
                        "{} failed: {}",
                        s("reference"),
                        d["error"]["message"].as_str().unwrap_or("")
                    )
                } else {
                    format!("{} running", s("reference"))
                };
                writeln!(
                    out,
                    "  deploy {:<9} {:<24} {} {what}",
                    s("kind"),
                    s("time"),
                    s("agent")
                )?;
            }
        }
        // A failed build is what was asked for, shown: its exit code says how it ended.
        Ok(if status.state == BuildState::Failed {
            EXIT_FAILURE
        } else {
            0
        })
    })
}

fn nats_logs(args: LogsArgs) -> anyhow::Result<i32> {
    use crate::bus::StageEvent;
    use crate::pipeline::events::ends_build;
    use futures::StreamExt;
    let print = |event: &StageEvent| print_event(event, args.json);
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        let mut failed = false;
        if !args.follow {
            let events = bus.build_events(&args.build).await?;
            if events.is_empty() {
                anyhow::bail!(
                    "no events for build {} (is the id right? `kiln status` lists builds)",
                    args.build
                );
            }
            for ev in events {
                match ev.event {
                    Ok(event) => {
                        failed |= matches!(event, StageEvent::Failed(_));
                        print(&event)?;
                    }
                    Err(e) => eprintln!("warning: {} (sequence {}): {e}", ev.subject, ev.sequence),
                }
            }
            return Ok(if failed { EXIT_FAILURE } else { 0 });
        }
        let events = bus.follow(&args.build, true).await?;
        tokio::pin!(events);
        while let Some(ev) = events.next().await {
            let ev = ev?;
            let event = match ev.event {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("warning: {} (sequence {}): {e}", ev.subject, ev.sequence);
                    continue;
                }
            };
            print(&event)?;
            if ends_build(&event) {
                return Ok(if matches!(event, StageEvent::Failed(_)) {
                    EXIT_FAILURE
                } else {
                    0
                });
            }
        }
        anyhow::bail!("the event stream of build {} ended", args.build)
    })
}

/// `kiln rollout …`.
fn rollout(args: RolloutArgs) -> anyhow::Result<i32> {
    match args.action {
        Some(RolloutAction::Status(a)) => rollout_status(a),
        Some(RolloutAction::Resume(a)) => rollout_change(&a.id, a.json, &a.nats, |r| {
            use crate::bus::{HostState, RolloutState};
            if r.state != RolloutState::Halted {
                return Err(format!(
                    "rollout {} is {}: only a halted rollout resumes",
                    r.id,
                    r.state.name()
                ));
            }
            let mut first = r.wave;
            for h in r.hosts.iter_mut().filter(|h| h.state == HostState::Failed) {
                h.state = HostState::Pending;
                first = first.min(h.wave);
            }
            r.wave = first;
            r.state = RolloutState::Running;
            r.reason = None;
            r.bake_since_ms = None;
            r.event = "resumed".into();
            Ok(())
        }),
        Some(RolloutAction::Abort(a)) => rollout_change(&a.id, a.json, &a.nats, |r| {
            use crate::bus::RolloutState;
            if matches!(r.state, RolloutState::Completed | RolloutState::Aborted) {
                return Err(format!("rollout {} is {} already", r.id, r.state.name()));
            }
            r.state = RolloutState::Aborted;
            r.reason = Some(a.reason.clone());
            r.event = "aborted".into();
            Ok(())
        }),
        Some(RolloutAction::List(a)) => rollout_list(a),
        None => rollout_start(args),
    }
}

fn rollout_start(args: RolloutArgs) -> anyhow::Result<i32> {
    use crate::bus::agents::{Inventory, in_group, valid_group};
    use crate::bus::rollouts::{Rollouts, parse_waves, plan};
    use crate::bus::{HostState, Rollout, RolloutHost, RolloutState};
    use crate::store::{Location, Reference};
    let (Some(reference), Some(group)) = (args.reference.as_deref(), args.group.as_deref()) else {
        return Err(BadInput::Message(
            "give the image and --group (see kiln rollout --help)".into(),
        )
        .into());
    };
    let r = Reference::parse(reference).map_err(BadInput::error)?;
    let (Location::Registry { host, repository }, Some(digest)) = (&r.location, &r.digest) else {
        return Err(BadInput::Message(format!(
            "{reference}: give the image in a registry by digest (host:port/repository@sha256:…): \
             a tag can move while the rollout runs"
        ))
        .into());
    };
    if !valid_group(group) {
        return Err(BadInput::Message(format!(
            "--group {group:?}: a group is 1 to 64 letters, digits, '-', '_' or '.'"
        ))
        .into());
    }
    let waves = parse_waves(&args.waves)
        .map_err(|e| BadInput::Message(format!("--waves {}: {e}", args.waves)))?;
    let repository = format!("{host}/{repository}");
    let digest = digest.to_string();
    let json = args.json;
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        let now = crate::time::now_ms() as i64;
        let entries = match Inventory::open_existing(&bus).await? {
            Some(inv) => in_group(inv.list(now).await?, Some(group)),
            None => Vec::new(),
        };
        let hosts: Vec<String> = entries
            .iter()
            .filter(|e| e.state != "gone")
            .map(|e| e.heartbeat.agent.clone())
            .collect();
        if hosts.is_empty() {
            return Err(BadInput::Message(format!(
                "no agent of group {group} is there to roll out to (`kiln agents --group {group}` lists them; \
                 agents join with `kiln agent --group {group}`)"
            ))
            .into());
        }
        let plan = plan(&hosts, &waves);
        let user = user_name();
        let rollout = Rollout {
            v: crate::bus::VERSION,
            id: format!("r-{}", crate::bus::new_build_id()),
            event: "requested".into(),
            reference: format!("{repository}@{digest}"),
            repository,
            digest,
            group: group.to_string(),
            waves: args.waves.split(',').map(|w| w.trim().to_string()).collect(),
            hosts: plan
                .iter()
                .enumerate()
                .flat_map(|(i, w)| {
                    w.iter().map(move |a| RolloutHost {
                        agent: a.clone(),
                        wave: i,
                        state: HostState::Pending,
                        order: None,
                        attempts: 0,
                        ordered_ms: None,
                        answered_ms: None,
                        detail: None,
                    })
                })
                .collect(),
            plan,
            max_unavailable: args.max_unavailable.max(1),
            max_failures: args.max_failures,
            bake_s: args.bake,
            deploy_timeout_s: args.deploy_timeout.max(1),
            by: format!("{user}@{}", crate::pipeline::worker::host_name()),
            state: RolloutState::Running,
            wave: 0,
            bake_since_ms: None,
            reason: None,
            controller: None,
            lease_until_ms: 0,
            created_ms: now,
            updated_ms: now,
            time: crate::bus::EventTime::now(),
        };
        let rollouts = Rollouts::open(&bus).await?;
        rollouts.create(&rollout).await?;
        if json && !args.follow {
            println!("{}", serde_json::to_string_pretty(&rollout)?);
        } else if !json {
            print!("{}", crate::rollout::describe(&rollout));
        }
        if args.follow {
            return follow_rollout(&rollouts, &rollout.id, json).await;
        }
        if !json {
            println!(
                "follow it with `kiln rollout status {} --follow` (a controller runs it: `kiln up` has one)",
                rollout.id
            );
        }
        Ok(0)
    })
}

/// Print the rollout's changes until it ends; 0 when it completes.
async fn follow_rollout(
    rollouts: &crate::bus::rollouts::Rollouts,
    id: &str,
    json: bool,
) -> anyhow::Result<i32> {
    use crate::bus::RolloutState;
    let mut seen = 0;
    loop {
        let Some((r, revision)) = rollouts.get(id).await? else {
            return Err(BadInput::Message(format!("no rollout {id}")).into());
        };
        if revision != seen {
            seen = revision;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let hosts: Vec<String> = r
                    .hosts
                    .iter()
                    .filter(|h| h.wave == r.wave.min(r.plan.len().saturating_sub(1)))
                    .map(|h| format!("{} {:?}", h.agent, h.state).to_lowercase())
                    .collect();
                println!(
                    "{} {} wave {}/{}: {}",
                    crate::time::rfc3339(r.updated_ms, crate::time::Precision::Seconds),
                    r.event,
                    (r.wave + 1).min(r.plan.len()),
                    r.plan.len(),
                    hosts.join(", ")
                );
            }
            match r.state {
                RolloutState::Running => {}
                RolloutState::Completed => return Ok(0),
                RolloutState::Halted | RolloutState::Aborted => {
                    if !json {
                        println!("{}: {}", r.state.name(), r.reason.as_deref().unwrap_or("-"));
                    }
                    return Ok(EXIT_FAILURE);
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn rollout_status(a: RolloutIdArgs) -> anyhow::Result<i32> {
    use crate::bus::RolloutState;
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&a.nats.connect_options()).await?;
        let rollouts = crate::bus::rollouts::Rollouts::open(&bus).await?;
        if a.follow {
            return follow_rollout(&rollouts, &a.id, a.json).await;
        }
        let Some((r, _)) = rollouts.get(&a.id).await? else {
            return Err(BadInput::Message(format!(
                "no rollout {} (`kiln rollout list` shows them)",
                a.id
            ))
            .into());
        };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{}", crate::rollout::describe(&r));
        }
        Ok(match r.state {
            RolloutState::Running | RolloutState::Completed => 0,
            RolloutState::Halted | RolloutState::Aborted => EXIT_FAILURE,
        })
    })
}

/// Change a rollout with `change` (compare-and-set, retried when a controller wrote first) and
/// put the change on the stream.
fn rollout_change(
    id: &str,
    json: bool,
    nats: &NatsOpts,
    change: impl Fn(&mut crate::bus::Rollout) -> Result<(), String>,
) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&nats.connect_options()).await?;
        let rollouts = crate::bus::rollouts::Rollouts::open(&bus).await?;
        for _ in 0..20 {
            let Some((mut r, revision)) = rollouts.get(id).await? else {
                return Err(BadInput::Message(format!(
                    "no rollout {id} (`kiln rollout list` shows them)"
                ))
                .into());
            };
            change(&mut r).map_err(BadInput::Message)?;
            r.updated_ms = crate::time::now_ms() as i64;
            r.time = crate::bus::EventTime::now();
            if rollouts.update(&r, revision, true).await?.is_some() {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", crate::rollout::describe(&r));
                }
                return Ok(0);
            }
        }
        anyhow::bail!("rollout {id} kept changing under this command; try again")
    })
}

fn rollout_list(a: RolloutListArgs) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&a.nats.connect_options()).await?;
        let list = crate::bus::rollouts::Rollouts::open(&bus)
            .await?
            .list()
            .await?;
        if a.json {
            let all: Vec<&crate::bus::Rollout> = list.iter().map(|(r, _)| r).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "rollouts": all }))?
            );
            return Ok(0);
        }
        if list.is_empty() {
            println!("no rollouts");
        }
        for (r, _) in &list {
            println!(
                "{:<30} {:<9} wave {}/{} {:<10} {}",
                r.id,
                r.state.name(),
                (r.wave + 1).min(r.plan.len()),
                r.plan.len(),
                r.group,
                r.reference
            );
        }
        Ok(0)
    })
}

/// `kiln controller`.
fn controller(args: ControllerArgs) -> anyhow::Result<i32> {
    let name = args.name.unwrap_or_else(|| {
        format!(
            "{}-{}",
            crate::pipeline::worker::host_name(),
            std::process::id()
        )
    });
    runtime()?.block_on(async {
        let bus = crate::bus::Bus::connect(&args.nats.connect_options()).await?;
        tracing::info!(
            "rollout controller {name} running against {}",
            redact(&args.nats.url)
        );
        crate::rollout::run(&bus, &name, shutdown_signal()).await?;
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_notes_print_as_the_json_lines_they_always_were() {
        use crate::pipeline::build::StageNote;
        use crate::pipeline::stages::ProgressUpdate;
        let v = |n: StageNote| serde_json::to_value(n).unwrap();
        assert_eq!(
            v(StageNote::Started),
            serde_json::json!({"kind": "started"})
        );
        assert_eq!(
            v(StageNote::Progress(ProgressUpdate::new(Some(0.5), "x"))),
            serde_json::json!({"kind": "progress", "fraction": 0.5, "message": "x"})
        );
        let cache = crate::bus::CacheStatus::Hit;
        assert_eq!(
            v(StageNote::Completed {
                cache,
                seconds: 1.5
            }),
            serde_json::json!({"kind": "completed", "cache": cache, "seconds": 1.5})
        );
    }

    #[test]
    fn exit_codes_are_decided_by_the_error() {
        use crate::pipeline::bus_build::BusBuildError;
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        // Input: a bad argument, or a library error about a file the user named.
        assert_eq!(
            exit_code(&BadInput::Message("--size lots".into()).into()),
            2
        );
        assert_eq!(exit_code(&BadInput::error(io()).into()), 2);
        let wrapped = anyhow::Error::new(BadInput::error(io())).context("--trust");
        assert_eq!(exit_code(&wrapped), 2);
        // Operational: anything else.
        assert_eq!(exit_code(&io().into()), 1);
        assert_eq!(exit_code(&anyhow::anyhow!("the stream ended")), 1);
        // Interrupted.
        assert_eq!(
            exit_code(&BusBuildError::Interrupted("b".into()).into()),
            130
        );
        assert_eq!(exit_code(&BusBuildError::StreamEnded("b".into()).into()), 1);
        let profile = crate::verify::VerifyError::ProfileName {
            name: "../x".into(),
        };
        assert_eq!(exit_code(&profile.into()), 2);
    }
}
