//! The read-only views the dashboard is drawn from — and that scripts may use like the rest of
//! the API: one live stream of everything that happens (`GET /v1/events`), a build's serial
//! consoles (`GET /v1/builds/{id}/serial`), published images with the agents running them
//! (`GET /v1/images`) and what vouches for one (`GET /v1/images/verify?ref=REPO@DIGEST`), and the
//! farm's health (`GET /v1/farm`). Each reads the stream, the object store, the KV buckets or
//! the registry; none changes anything, so none needs the token.

use super::{ApiError, AppState, ClientAddr};
use crate::bus::messages::{CacheStatus, ImagePublished, ImageRevoked, StageEvent};
use crate::bus::subjects::Stage;
use crate::digest::Digest256;
use axum::extract::{Extension, Path, State};
use axum::http::{self, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The subjects `GET /v1/events` forwards, and the SSE event name of each.
const LIVE: [(&str, &str); 5] = [
    ("kiln.build.>", "build"),
    ("kiln.deploy.>", "deploy"),
    ("kiln.image.>", "image"),
    ("kiln.rollout.>", "rollout"),
    ("kiln.agent.*.heartbeat", "agent"),
];

/// The largest serial log served; a longer one is served from its end.
pub const SERIAL_MAX_BYTES: usize = 2 << 20;
/// How far back in the stream the farm's figures look (stream sequences).
const FARM_WINDOW: u64 = 20_000;
/// A worker is "recent" when it published an event this long ago at most.
const RECENT_WORKER: Duration = Duration::from_secs(15 * 60);
/// How long a verification of an image is reused (signatures and attestations of a digest do
/// not change; a revocation is read from the stream on every request).
const VERIFIED_REUSE: Duration = Duration::from_secs(300);
/// Verifications remembered at most.
const VERIFIED_MAX: usize = 512;

/// `GET /v1/events`: server-sent events, live only, of every build request and stage event
/// (`build`), deployment (`deploy`), image announcement (`image`), rollout step (`rollout`) and
/// agent heartbeat (`agent`); each `data` is `{"subject", "message"}` with the message as
/// published (docs/messages.md).
pub(super) async fn live(
    State(state): State<AppState>,
    client: Option<Extension<ClientAddr>>,
) -> Result<Response, ApiError> {
    let ip = ClientAddr::ip(client.as_ref().map(|Extension(c)| c));
    let slot = state.0.followers.follow(ip, &state.0.limits)?;
    let nats = state.0.bus.client();
    let mut subscriptions = Vec::new();
    for (subject, name) in LIVE {
        let sub = nats.subscribe(subject).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus",
                format!("cannot subscribe to {subject}: {e}"),
            )
        })?;
        subscriptions.push(sub.map(move |m| (name, m)));
    }
    let merged = futures::stream::select_all(subscriptions).map(move |(name, m)| {
        let _held = &slot;
        let message: serde_json::Value =
            serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
        let data = json!({ "subject": m.subject.as_str(), "message": message });
        Ok::<Event, Infallible>(Event::default().event(name).data(data.to_string()))
    });
    // A first comment at once, so the client sees the stream open before anything happens.
    let hello = futures::stream::once(async { Ok(Event::default().comment("kiln events")) });
    Ok(Sse::new(hello.chain(merged))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `GET /v1/builds/{id}/serial`: the serial console of each boot of the build's verify stage,
/// escape sequences removed, from the logs the stage stored in the object store. While a boot
/// runs there is no log yet: its last lines come as `progress` events.
pub(super) async fn serial(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let events = state.0.bus.build_events(&id).await?;
    if events.is_empty() && !state.accepted(&id) {
        return Err(super::unknown_build(&id));
    }
    let outputs = events
        .iter()
        .filter_map(|r| match &r.event {
            Ok(StageEvent::Completed(c)) if c.stage == Stage::Verify => Some(&c.outputs),
            _ => None,
        })
        .next_back();
    let mut boots = Vec::new();
    if let Some(serde_json::Value::Object(map)) = outputs {
        for (key, boot) in map {
            let Some(profile) = key.strip_prefix("verify.") else {
                continue;
            };
            let log = boot["serial_log_blob"].as_str().and_then(Digest256::parse);
            let (text, truncated) = match &log {
                Some(d) => match read_object_tail(&state.0.bus, d, SERIAL_MAX_BYTES).await? {
                    Some((bytes, truncated)) => {
                        (Some(crate::verify::serial::console_text(&bytes)), truncated)
                    }
                    None => (None, false),
                },
                None => (None, false),
            };
            boots.push(json!({
                "profile": profile,
                "log": log,
                "text": text,
                "truncated": truncated,
                "marker_line": boot["marker_line"],
                "time_to_marker": boot["time_to_marker"],
                "accel": boot["accel"],
            }));
        }
    }
    Ok(axum::Json(json!({ "build": id, "boots": boots })))
}

/// The last `max` bytes of object `digest` in the blob bucket, and whether that is not all of
/// it; None when the bucket or the object is not there (collected).
async fn read_object_tail(
    bus: &crate::bus::Bus,
    digest: &Digest256,
    max: usize,
) -> Result<Option<(Vec<u8>, bool)>, ApiError> {
    use tokio::io::AsyncReadExt;
    let Ok(store) = bus
        .jetstream()
        .get_object_store(crate::bus::BLOB_BUCKET)
        .await
    else {
        return Ok(None);
    };
    let Ok(mut object) = store.get(digest.as_str()).await else {
        return Ok(None);
    };
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = object.read(&mut buf).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus",
                format!("cannot read {digest} from the object store: {e}"),
            )
        })?;
        if n == 0 {
            break;
        }
        tail.extend(&buf[..n]);
        if tail.len() > max {
            tail.drain(..tail.len() - max);
            truncated = true;
        }
    }
    Ok(Some((tail.into(), truncated)))
}

/// `GET /v1/images`: every image announced on the stream ([`catalog`]), with the agents running
/// each (from their heartbeats).
pub(super) async fn images(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let bus = &state.0.bus;
    let mut images = catalog(&bus.stored_messages("kiln.image.>").await?);
    let now = crate::time::now_ms() as i64;
    let agents = match crate::bus::agents::Inventory::open_existing(bus).await? {
        Some(inv) => inv.list(now).await?,
        None => Vec::new(),
    };
    for image in &mut images {
        let digest = image["digest"].as_str().unwrap_or("");
        let running: Vec<serde_json::Value> = agents
            .iter()
            .filter(|a| a.state != "gone" && a.heartbeat.digest.as_deref() == Some(digest))
            .map(|a| json!({ "agent": a.heartbeat.agent, "state": a.state }))
            .collect();
        image["agents"] = json!(running);
    }
    Ok(axum::Json(json!({ "images": images })))
}

/// The images that `kiln.image.published.*` and `kiln.image.revoked.*` messages (in stream
/// order) tell of, newest first: each once per repository and digest, with the tags that point
/// at it now (a later announcement or promotion of the same tag moves it), its promotions and
/// its revocation. Messages that cannot be read are skipped.
pub fn catalog(messages: &[crate::bus::StoredMessage]) -> Vec<serde_json::Value> {
    let mut images: Vec<serde_json::Value> = Vec::new();
    // (repository, tag) → the index in `images` the tag points at now.
    let mut tags: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut revoked: HashMap<(String, String), ImageRevoked> = HashMap::new();
    for m in messages {
        if m.subject.starts_with("kiln.image.revoked.") {
            if let Ok(r) = serde_json::from_slice::<ImageRevoked>(&m.payload) {
                revoked.insert((r.repository.clone(), r.digest.clone()), r);
            }
            continue;
        }
        let Ok(p) = serde_json::from_slice::<ImagePublished>(&m.payload) else {
            continue;
        };
        let known = images
            .iter()
            .position(|v| v["repository"] == p.repository && v["digest"] == p.digest);
        let i = match known {
            Some(i) => i,
            None => {
                images.push(json!({
                    "repository": p.repository,
                    "digest": p.digest,
                    "reference": format!("{}@{}", p.repository, p.digest),
                    "build": p.build,
                    "published": crate::bus::status::time_text(&p.time),
                    "signature": p.signature,
                    "verification": p.verification,
                    "promotions": [],
                }));
                images.len() - 1
            }
        };
        if let Some(promotion) = &p.promotion
            && let Some(list) = images[i]["promotions"].as_array_mut()
        {
            list.push(json!(promotion));
        }
        for tag in &p.tags {
            tags.insert((p.repository.clone(), tag.clone()), i);
        }
    }
    for (i, image) in images.iter_mut().enumerate() {
        let repository = image["repository"].as_str().unwrap_or("").to_string();
        let digest = image["digest"].as_str().unwrap_or("").to_string();
        let current: Vec<&String> = tags
            .iter()
            .filter(|((r, _), at)| *r == repository && **at == i)
            .map(|((_, t), _)| t)
            .collect();
        image["tags"] = json!(current);
        image["revoked"] = match revoked.get(&(repository, digest)) {
            Some(r) => json!({
                "reason": r.reason,
                "by": r.by,
                "time": crate::bus::status::time_text(&r.time),
            }),
            None => serde_json::Value::Null,
        };
    }
    images.reverse();
    images
}

/// What `kiln verify` found for one image, remembered for [`VERIFIED_REUSE`].
#[derive(Default)]
pub(super) struct Verified {
    entries: Mutex<HashMap<String, (Instant, serde_json::Value)>>,
}

/// `GET /v1/images/verify?ref=REPO@DIGEST`: the image's signature, SBOM (with its packages),
/// provenance and boot attestation checked with the keys of this `kiln up` (its `--key`'s
/// public key and its verifier key), as `kiln verify --json` reports them, plus its size. Only
/// for images announced on the stream (404 otherwise), so that no reader can point the server
/// at another host.
pub(super) async fn verify(
    State(state): State<AppState>,
    uri: http::Uri,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let reference = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("ref="))
        .map(crate::net::percent_decode)
        .ok_or_else(|| {
            ApiError::invalid(
                Some("ref".into()),
                "give the image as ?ref=REPOSITORY@sha256:… (GET /v1/images lists them)",
            )
        })?;
    if !reference.contains("@sha256:") {
        return Err(ApiError::invalid(
            Some("ref".into()),
            format!("{reference:?} names no digest: give REPOSITORY@sha256:…"),
        ));
    }
    {
        let cache = state
            .0
            .verified
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, v)) = cache.get(&reference)
            && at.elapsed() < VERIFIED_REUSE
        {
            return Ok(axum::Json(v.clone()));
        }
    }
    // Only images announced here: a reader cannot make this server fetch from anywhere else.
    let announced = catalog(&state.0.bus.stored_messages("kiln.image.>").await?);
    if !announced
        .iter()
        .any(|i| i["reference"] == reference.as_str())
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "{reference} is not an image announced on this kiln's stream (GET /v1/images lists them)"
            ),
        ));
    }
    let Some(trust) = state.0.trust.clone() else {
        return Ok(axum::Json(json!({
            "reference": reference,
            "error": "this kiln up publishes nothing (no --publish-to and --key), so it has no key to check images with; use `kiln verify REF --key …`",
        })));
    };
    let r = reference.clone();
    let report = tokio::task::spawn_blocking(move || {
        let report =
            crate::store::verify_image(&r, &trust.key, &trust.verifiers, &[], &trust.store)?;
        let size = crate::store::images(r.split('@').next().unwrap_or(&r), &trust.store)
            .ok()
            .and_then(|list| {
                list.into_iter()
                    .find(|i| i.manifest_digest == report.manifest_digest)
                    .map(|i| (i.size, i.format))
            });
        Ok::<_, crate::store::StoreError>((report, size))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the verification thread failed: {e}"),
        )
    })?;
    let value = match report {
        Ok((report, size)) => {
            let packages: Vec<serde_json::Value> = report
                .sbom
                .as_ref()
                .and_then(|s| s["packages"].as_array())
                .into_iter()
                .flatten()
                .filter(|p| p["SPDXID"].as_str() != Some("SPDXRef-image"))
                .map(|p| json!({ "name": p["name"], "version": p["versionInfo"] }))
                .collect();
            let mut v = serde_json::to_value(&report).unwrap_or_default();
            v["packages"] = json!(packages);
            if let Some((bytes, format)) = size {
                v["size"] = json!(bytes);
                v["format"] = json!(format);
            }
            v
        }
        // A registry that cannot be reached or refuses is reported, not an API failure.
        Err(e) => json!({ "reference": reference, "error": crate::error::chain_text(&e) }),
    };
    let mut cache = state
        .0
        .verified
        .entries
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if cache.len() >= VERIFIED_MAX {
        cache.retain(|_, (at, _)| at.elapsed() < VERIFIED_REUSE);
        if cache.len() >= VERIFIED_MAX {
            cache.clear();
        }
    }
    if value.get("error").is_none() {
        cache.insert(reference, (Instant::now(), value.clone()));
    }
    Ok(axum::Json(value))
}

/// The keys and registry options `GET /v1/images/verify` checks images with.
#[derive(Clone)]
pub struct Trust {
    pub key: crate::store::VerifyingKey,
    pub verifiers: Vec<crate::store::VerifyingKey>,
    pub store: crate::store::StoreOptions,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").finish_non_exhaustive()
    }
}

/// `GET /v1/farm`: the farm's health from the stream: per stage the messages waiting and being
/// worked on, cache hits and misses of the recent builds, the workers heard from in the last
/// 15 minutes (and what they ran), and the sizes of the stream and the object store.
pub(super) async fn farm(
    State(state): State<AppState>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let bus = &state.0.bus;
    let js = bus.jetstream();
    let mut kiln = bus.kiln_stream().await?;
    let info = kiln.info().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus",
            format!("cannot read the KILN stream's state: {e}"),
        )
    })?;
    let (last, stream_bytes, stream_messages) = (
        info.state.last_sequence,
        info.state.bytes,
        info.state.messages,
    );
    let mut stages = Vec::new();
    for stage in Stage::ALL {
        let (mut pending, mut working) = (None, None);
        let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
            kiln.get_consumer(&stage.consumer_name()).await;
        if let Ok(mut c) = consumer
            && let Ok(i) = c.info().await
        {
            pending = Some(i.num_pending);
            working = Some(i.num_ack_pending);
        }
        stages.push((stage, pending, working, 0u64, 0u64, Vec::<u64>::new()));
    }
    let recent = bus
        .stored_messages_since(
            "kiln.build.*.*.completed",
            last.saturating_sub(FARM_WINDOW) + 1,
        )
        .await?;
    let now = crate::time::now_ms();
    let mut workers: BTreeMap<String, (u64, Vec<&'static str>, u64)> = BTreeMap::new();
    for m in &recent {
        let Ok(StageEvent::Completed(c)) = crate::bus::subjects::parse_stage_subject(&m.subject)
            .ok_or(())
            .and_then(|s| StageEvent::decode(s.kind, &m.payload).map_err(|_| ()))
        else {
            continue;
        };
        if let Some(row) = stages.iter_mut().find(|r| r.0 == c.stage) {
            match c.cache {
                CacheStatus::Hit => row.3 += 1,
                CacheStatus::Miss => {
                    row.4 += 1;
                    row.5.push(c.duration_ms);
                }
            }
        }
        if now.saturating_sub(m.published_ms) <= RECENT_WORKER.as_millis() as u64 {
            let w = workers.entry(c.worker.clone()).or_default();
            w.0 = w.0.max(m.published_ms);
            if !w.1.contains(&c.stage.name()) {
                w.1.push(c.stage.name());
            }
            w.2 += 1;
        }
    }
    let (hits, misses) = stages.iter().fold((0, 0), |(h, m), r| (h + r.3, m + r.4));
    let stage_rows: Vec<serde_json::Value> = stages
        .into_iter()
        .map(|(stage, pending, working, hit, miss, mut ms)| {
            ms.sort_unstable();
            json!({
                "stage": stage.name(),
                "pending": pending,
                "working": working,
                "hits": hit,
                "misses": miss,
                "median_miss_ms": ms.get(ms.len() / 2),
            })
        })
        .collect();
    let worker_rows: Vec<serde_json::Value> = workers
        .into_iter()
        .map(|(name, (at, stages, n))| {
            json!({
                "worker": name,
                "last_seen_s": now.saturating_sub(at) / 1000,
                "stages": stages,
                "completed": n,
            })
        })
        .collect();
    let object_store_bytes = match js
        .get_stream(format!("OBJ_{}", crate::bus::BLOB_BUCKET))
        .await
    {
        Ok(mut s) => s.info().await.ok().map(|i| i.state.bytes),
        Err(_) => None,
    };
    let ratio = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
    Ok(axum::Json(json!({
        "stages": stage_rows,
        "cache": { "hits": hits, "misses": misses, "hit_ratio": ratio },
        "workers": worker_rows,
        "window_messages": FARM_WINDOW,
        "stream": { "messages": stream_messages, "bytes": stream_bytes },
        "object_store_bytes": object_store_bytes,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(subject: &str, payload: serde_json::Value) -> crate::bus::StoredMessage {
        crate::bus::StoredMessage {
            sequence: 0,
            subject: subject.into(),
            published_ms: 0,
            payload: serde_json::to_vec(&payload).unwrap().into(),
        }
    }

    fn published(digest: &str, tags: &[&str], promotion: bool) -> crate::bus::StoredMessage {
        let mut v = json!({
            "v": 1, "build": format!("b-{digest}"), "repository": "r:5000/app",
            "reference": format!("r:5000/app:{}@{digest}", tags[0]), "digest": digest,
            "tags": tags, "time": "2026-12-06T00:00:00Z",
        });
        if promotion {
            v["promotion"] =
                json!({ "channel": tags[0], "by": "ops@h", "from": "r:5000/app:latest" });
        }
        message("kiln.image.published.r_5000_app", v)
    }

    #[test]
    fn the_catalog_moves_tags_and_marks_revocations() {
        let revoke = message(
            "kiln.image.revoked.r_5000_app",
            json!({ "v": 1, "repository": "r:5000/app", "reference": "r:5000/app@sha256:a",
                    "digest": "sha256:a", "reason": "CVE", "by": "ops@h",
                    "time": "2026-12-06T01:00:00Z" }),
        );
        let list = catalog(&[
            published("sha256:a", &["latest", "v1"], false),
            published("sha256:b", &["latest", "v2"], false),
            message(
                "kiln.image.published.r_5000_app",
                json!({ "not": "an image" }),
            ),
            published("sha256:a", &["stable"], true),
            revoke,
        ]);
        assert_eq!(list.len(), 2, "{list:?}");
        // Newest first; `latest` moved to b; a is `v1` and, promoted, `stable`.
        assert_eq!(list[0]["digest"], "sha256:b");
        assert_eq!(list[0]["tags"], json!(["latest", "v2"]));
        assert_eq!(list[0]["revoked"], serde_json::Value::Null);
        assert_eq!(list[1]["tags"], json!(["stable", "v1"]));
        assert_eq!(list[1]["revoked"]["reason"], "CVE");
        assert_eq!(list[1]["reference"], "r:5000/app@sha256:a");
    }
}
