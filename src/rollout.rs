//! Rollouts in waves: the controller that moves an image through a group of agents, wave by
//! wave, and stops at the first sign of trouble.
//!
//! A rollout is an entry of the `kiln-rollouts` bucket ([`crate::bus::rollouts`]) made by
//! `kiln rollout` with its plan (the hosts of each wave, fixed when it starts). Any number of
//! controllers (`kiln controller`, and one in `kiln up`) look at the running rollouts every
//! [`TICK`] ([`IDLE_TICK`] while none runs; they do not create the bucket). One at a time
//! moves each, holding a lease that it renews with compare-and-set, so a controller that dies
//! (or loses NATS) is replaced by another within [`LEASE`], which goes on where the entry
//! says. Each step:
//!
//! 1. reads the answers of the agents it sent [`DeployOrder`]s to (`kiln.deploy.<agent>.*`
//!    carrying the order's id); an agent that does not answer within the deploy timeout failed;
//! 2. halts the rollout when more hosts failed than allowed (the failed ones rolled themselves
//!    back; the hosts of later waves are never asked);
//! 3. sends orders to the wave's next hosts, at most `max_unavailable` at a time. An order is
//!    recorded before it is sent, and a controller that takes over sends the recorded orders
//!    that have no answer again; agents answer an order they have seen from what runs, so no
//!    host deploys twice;
//! 4. once every host of the wave runs the image, bakes: every host deployed so far must stay
//!    healthy on the image (its heartbeat) for `bake_s`, then the next wave starts.
//!
//! Every change goes on the stream as `kiln.rollout.<id>.<event>` (the whole entry), so
//! `kiln rollout status` and the history read back from it.

use crate::bus::agents::{AgentEntry, Inventory};
use crate::bus::rollouts::Rollouts;
use crate::bus::{
    Bus, BusError, DeployCompleted, DeployFailed, DeployKind, DeployOrder, EventTime, HostState,
    ImagePublished, Rollout, RolloutState, VERSION, subjects,
};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::Duration;

/// How often a controller looks at the running rollouts.
pub const TICK: Duration = Duration::from_millis(500);
/// How often a controller looks when no rollout runs.
pub const IDLE_TICK: Duration = Duration::from_secs(2);
/// How long a controller's claim on a rollout lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(5);

/// How long after an agent's answer its heartbeat may still name the image before.
const HEARTBEAT_GRACE_MS: i64 = 5_000;

/// One order to send once the step that made it is stored.
struct Send {
    agent: String,
    order: String,
}

/// What one step changed: the events to put on the stream and the orders to send.
#[derive(Default)]
struct Step {
    events: Vec<&'static str>,
    orders: Vec<Send>,
}

/// An agent's answer to an order.
enum Answer {
    Completed(DeployCompleted),
    Failed(DeployFailed),
}

/// Run a controller named `name` until `shutdown` completes.
pub async fn run(
    bus: &Bus,
    name: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BusError> {
    let mut rollouts: Option<Rollouts> = None;
    let mut sent: HashSet<String> = HashSet::new();
    let mut pause = TICK;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
        // Idle (no bucket yet, or nothing running): look less often.
        pause = IDLE_TICK;
        if rollouts.is_none() {
            match Rollouts::open_existing(bus).await {
                Ok(r) => rollouts = r,
                Err(e) => tracing::debug!("rollout controller: {}", crate::error::Chain(&e)),
            }
        }
        let Some(rollouts) = &rollouts else { continue };
        let list = match rollouts.list().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("rollout controller: {}", crate::error::Chain(&e));
                continue;
            }
        };
        for (r, revision) in list {
            if r.state != RolloutState::Running {
                continue;
            }
            pause = TICK;
            let now = crate::time::now_ms() as i64;
            if r.controller.as_deref() != Some(name) && r.lease_until_ms > now {
                continue;
            }
            if let Err(e) = advance(bus, rollouts, name, r, revision, &mut sent).await {
                tracing::warn!("rollout controller: {}", crate::error::Chain(&e));
            }
        }
    }
}

/// Claim `r` (at `revision`) and move it one step.
async fn advance(
    bus: &Bus,
    rollouts: &Rollouts,
    name: &str,
    mut r: Rollout,
    revision: u64,
    sent: &mut HashSet<String>,
) -> Result<(), BusError> {
    let now = crate::time::now_ms() as i64;
    let taken_over = r.controller.as_deref() != Some(name);
    r.controller = Some(name.to_string());
    r.lease_until_ms = now + LEASE.as_millis() as i64;
    let inventory = match Inventory::open_existing(bus).await? {
        Some(inv) => inv.list(now).await?,
        None => Vec::new(),
    };
    let agents: BTreeMap<String, AgentEntry> = inventory
        .into_iter()
        .map(|e| (e.heartbeat.agent.clone(), e))
        .collect();
    let answers = read_answers(bus, &r).await?;
    let mut step = step(&mut r, &agents, &answers, now);
    if taken_over {
        tracing::info!("rollout {}: controller {name} takes it", r.id);
        step.events.insert(0, "claimed");
        // Orders a controller before this one recorded but may not have sent.
        for h in &r.hosts {
            if let (HostState::Ordered, Some(order)) = (h.state, &h.order)
                && !sent.contains(order)
                && !step.orders.iter().any(|s| &s.order == order)
            {
                step.orders.push(Send {
                    agent: h.agent.clone(),
                    order: order.clone(),
                });
            }
        }
    }
    r.updated_ms = now;
    if let Some(e) = step.events.last() {
        r.event = e.to_string();
    }
    r.time = EventTime::now();
    if rollouts.update(&r, revision, false).await?.is_none() {
        // Another controller or `kiln rollout abort` changed it first: look again next tick.
        return Ok(());
    }
    for event in &step.events {
        let mut e = r.clone();
        e.event = event.to_string();
        bus.publish_raw(e.subject(), crate::bus::encode(&e)).await?;
    }
    for s in step.orders {
        let order = DeployOrder {
            v: VERSION,
            agent: s.agent.clone(),
            rollout: r.id.clone(),
            order: s.order.clone(),
            image: announcement(&r),
            time: EventTime::now(),
        };
        bus.publish_deploy_order(&order).await?;
        tracing::info!(
            "rollout {}: ordered {} to deploy {}",
            r.id,
            s.agent,
            r.reference
        );
        sent.insert(s.order);
    }
    Ok(())
}

/// The image as the orders carry it.
pub fn announcement(r: &Rollout) -> ImagePublished {
    announcement_of(&r.repository, &r.reference, &r.digest)
}

/// An image named by digest as an announcement carries it (no build, tags or report): what an
/// agent deploys for an order or when it goes back from a revoked image.
pub fn announcement_of(repository: &str, reference: &str, digest: &str) -> ImagePublished {
    ImagePublished {
        v: VERSION,
        build: String::new(),
        repository: repository.to_string(),
        reference: reference.to_string(),
        digest: digest.to_string(),
        tags: Vec::new(),
        signature: None,
        verification: serde_json::Value::Null,
        promotion: None,
        time: EventTime::now(),
    }
}

/// The answers to the orders `r` is waiting for, by order id.
async fn read_answers(bus: &Bus, r: &Rollout) -> Result<BTreeMap<String, Answer>, BusError> {
    let mut out = BTreeMap::new();
    for h in &r.hosts {
        let (HostState::Ordered, Some(order)) = (h.state, &h.order) else {
            continue;
        };
        for kind in [DeployKind::Completed, DeployKind::Failed] {
            let subject = subjects::deploy(&h.agent, kind);
            for m in bus.stored_messages(&subject).await? {
                let answer = match kind {
                    DeployKind::Completed => crate::bus::decode::<DeployCompleted>(&m.payload)
                        .ok()
                        .filter(|c| c.order.as_ref() == Some(order))
                        .map(Answer::Completed),
                    DeployKind::Failed => crate::bus::decode::<DeployFailed>(&m.payload)
                        .ok()
                        .filter(|f| f.order.as_ref() == Some(order))
                        .map(Answer::Failed),
                };
                if let Some(a) = answer {
                    out.entry(order.clone()).or_insert(a);
                }
            }
        }
    }
    Ok(out)
}

/// Move `r` one step at `now`, given the agents' heartbeats and answers (pure).
fn step(
    r: &mut Rollout,
    agents: &BTreeMap<String, AgentEntry>,
    answers: &BTreeMap<String, Answer>,
    now: i64,
) -> Step {
    let mut out = Step::default();
    if r.state != RolloutState::Running {
        return out;
    }
    let wave = r.wave;
    // 1. Answers, and orders nobody answered in time.
    for h in r.hosts.iter_mut().filter(|h| h.state == HostState::Ordered) {
        let answer = h.order.as_ref().and_then(|o| answers.get(o));
        match answer {
            Some(Answer::Completed(c)) => {
                h.state = HostState::Deployed;
                h.answered_ms = Some(now);
                h.detail = Some(format!("runs {}", c.reference));
                out.events.push("deployed");
            }
            Some(Answer::Failed(f)) => {
                h.state = HostState::Failed;
                h.answered_ms = Some(now);
                h.detail = Some(f.error.message.clone());
                out.events.push("failed");
            }
            None if h
                .ordered_ms
                .is_some_and(|t| now - t > r.deploy_timeout_s as i64 * 1000) =>
            {
                h.state = HostState::Failed;
                h.answered_ms = Some(now);
                h.detail = Some(format!(
                    "no answer from {} within {} s (--deploy-timeout)",
                    h.agent, r.deploy_timeout_s
                ));
                out.events.push("failed");
            }
            None => {}
        }
    }
    // Hosts deployed so far must stay on the image and healthy.
    for h in r
        .hosts
        .iter_mut()
        .filter(|h| h.state == HostState::Deployed)
    {
        // An agent never leaves the bucket (it turns `gone`): one missing from a listing was
        // missed by that listing, and is judged at the next.
        let why = match agents.get(&h.agent) {
            None => None,
            Some(e) if e.state == "gone" => {
                Some(format!("no heartbeat for {} s (gone)", e.last_seen_s))
            }
            Some(e) if e.state == "unhealthy" => Some(format!(
                "its VM stopped running ({})",
                e.heartbeat.running.as_deref().unwrap_or("-")
            )),
            // A heartbeat older than the answer may still name the image before: judged only
            // once the agent has had time to say what it runs.
            Some(e)
                if e.state == "healthy"
                    && e.heartbeat.digest.as_ref() != Some(&r.digest)
                    && h.answered_ms.is_some_and(|t| now - t > HEARTBEAT_GRACE_MS) =>
            {
                Some(format!(
                    "it runs {} instead",
                    e.heartbeat.running.as_deref().unwrap_or("-")
                ))
            }
            _ => None,
        };
        if let Some(why) = why {
            h.state = HostState::Failed;
            h.detail = Some(format!("after it deployed {}: {why}", r.reference));
            out.events.push("failed");
        }
    }
    // 2. Too many failures halt the rollout.
    let failed: Vec<&crate::bus::RolloutHost> = r
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Failed)
        .collect();
    if failed.len() > r.max_failures as usize {
        let why: Vec<String> = failed
            .iter()
            .map(|h| format!("{}: {}", h.agent, h.detail.as_deref().unwrap_or("failed")))
            .collect();
        r.reason = Some(format!(
            "halted in wave {} of {}: {}",
            wave + 1,
            r.plan.len(),
            why.join("; ")
        ));
        r.state = RolloutState::Halted;
        r.bake_since_ms = None;
        out.events.push("halted");
        return out;
    }
    if wave >= r.plan.len() {
        r.state = RolloutState::Completed;
        out.events.push("completed");
        return out;
    }
    // 3. Orders for the wave's next hosts.
    let mut in_flight = r
        .hosts
        .iter()
        .filter(|h| h.wave == wave && h.state == HostState::Ordered)
        .count();
    for h in r
        .hosts
        .iter_mut()
        .filter(|h| h.wave == wave && h.state == HostState::Pending)
    {
        let entry = agents.get(&h.agent);
        match entry {
            Some(e) if e.state == "healthy" && e.heartbeat.digest.as_ref() == Some(&r.digest) => {
                h.state = HostState::Deployed;
                h.answered_ms = Some(now);
                h.detail = Some("ran the image already".into());
                out.events.push("deployed");
                continue;
            }
            Some(e) if e.state == "gone" => {
                h.state = HostState::Failed;
                h.detail = Some(format!("no heartbeat for {} s (gone)", e.last_seen_s));
                out.events.push("failed");
                continue;
            }
            // Missed by this listing (see below): the order is sent; an agent that is not
            // there fails after the deploy timeout.
            None | Some(_) => {}
        }
        if in_flight >= r.max_unavailable.max(1) as usize {
            continue;
        }
        h.attempts += 1;
        let order = format!("{}.{}.{}.{}", r.id, wave, h.agent, h.attempts);
        h.order = Some(order.clone());
        h.state = HostState::Ordered;
        h.ordered_ms = Some(now);
        h.answered_ms = None;
        h.detail = None;
        out.orders.push(Send {
            agent: h.agent.clone(),
            order,
        });
        out.events.push("ordered");
        in_flight += 1;
    }
    // 4. The wave is done when none of its hosts is pending or ordered: bake, then go on.
    let open = r
        .hosts
        .iter()
        .any(|h| h.wave == wave && matches!(h.state, HostState::Pending | HostState::Ordered));
    if open || !out.orders.is_empty() {
        return out;
    }
    let since = match r.bake_since_ms {
        Some(t) => t,
        None => {
            r.bake_since_ms = Some(now);
            out.events.push("baking");
            now
        }
    };
    let settled = r
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Deployed)
        .all(|h| {
            agents.get(&h.agent).is_some_and(|e| {
                e.state == "healthy" && e.heartbeat.digest.as_ref() == Some(&r.digest)
            })
        });
    if now - since >= r.bake_s as i64 * 1000 && settled {
        r.bake_since_ms = None;
        r.wave += 1;
        if r.wave >= r.plan.len() {
            r.state = RolloutState::Completed;
            out.events.push("completed");
        } else {
            out.events.push("wave");
        }
    }
    out
}

/// A rollout as `kiln rollout status` prints it.
pub fn describe(r: &Rollout) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "rollout {}: {} of {} to group {} ({})",
        r.id,
        r.state.name(),
        r.reference,
        r.group,
        match r.state {
            RolloutState::Running => format!("wave {} of {}", r.wave + 1, r.plan.len()),
            _ => format!("{} waves", r.plan.len()),
        }
    );
    let _ = writeln!(
        s,
        "waves {}, max unavailable {}, max failures {}, bake {} s; by {}",
        r.waves.join(","),
        r.max_unavailable,
        r.max_failures,
        r.bake_s,
        r.by
    );
    for (i, wave) in r.plan.iter().enumerate() {
        let _ = writeln!(s, "wave {}:", i + 1);
        for agent in wave {
            let Some(h) = r.hosts.iter().find(|h| &h.agent == agent) else {
                continue;
            };
            let state = match h.state {
                HostState::Pending => "pending",
                HostState::Ordered => "deploying",
                HostState::Deployed => "deployed",
                HostState::Failed => "failed",
            };
            let _ = writeln!(
                s,
                "  {:<16} {:<10} {}",
                h.agent,
                state,
                h.detail.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(why) = &r.reason {
        let _ = writeln!(s, "reason: {why}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{AgentHealth, AgentHeartbeat, ErrorInfo, ErrorKind, RolloutHost};

    const D2: &str = "sha256:2222";

    fn rollout(hosts: &[&str], waves: &[&[&str]]) -> Rollout {
        Rollout {
            v: VERSION,
            id: "r1".into(),
            event: "requested".into(),
            reference: format!("reg/app@{D2}"),
            repository: "reg/app".into(),
            digest: D2.into(),
            group: "web".into(),
            waves: vec!["1".into(); waves.len()],
            plan: waves
                .iter()
                .map(|w| w.iter().map(|s| s.to_string()).collect())
                .collect(),
            max_unavailable: 1,
            max_failures: 0,
            bake_s: 2,
            deploy_timeout_s: 60,
            by: "t@h".into(),
            state: RolloutState::Running,
            wave: 0,
            hosts: hosts
                .iter()
                .map(|a| RolloutHost {
                    agent: a.to_string(),
                    wave: waves.iter().position(|w| w.contains(a)).unwrap(),
                    state: HostState::Pending,
                    order: None,
                    attempts: 0,
                    ordered_ms: None,
                    answered_ms: None,
                    detail: None,
                })
                .collect(),
            bake_since_ms: None,
            reason: None,
            controller: None,
            lease_until_ms: 0,
            created_ms: 0,
            updated_ms: 0,
            time: EventTime::UnixMs(0),
        }
    }

    fn agent(name: &str, state: &'static str, digest: &str) -> (String, AgentEntry) {
        let hb = AgentHeartbeat {
            v: VERSION,
            agent: name.into(),
            groups: vec!["web".into()],
            watch: "reg/app:stable".into(),
            health: AgentHealth::Healthy,
            running: Some(format!("reg/app@{digest}")),
            digest: Some(digest.into()),
            previous: None,
            deploying: None,
            pid: None,
            uptime_s: None,
            listen: None,
            kiln_version: "0".into(),
            interval_s: 1,
            sent_ms: 0,
            time: EventTime::UnixMs(0),
        };
        (
            name.into(),
            AgentEntry {
                state,
                last_seen_s: 0,
                heartbeat: hb,
            },
        )
    }

    fn completed(order: &str) -> Answer {
        Answer::Completed(DeployCompleted {
            v: VERSION,
            agent: "a".into(),
            build: None,
            application: "app".into(),
            reference: format!("reg/app@{D2}"),
            previous: None,
            vm: serde_json::Value::Null,
            order: Some(order.into()),
            cause: None,
            pull: None,
            time: EventTime::UnixMs(0),
        })
    }

    #[test]
    fn waves_go_one_after_the_other_and_bake_before_the_next() {
        let mut r = rollout(&["a", "b"], &[&["a"], &["b"]]);
        let mut agents: BTreeMap<_, _> = [
            agent("a", "healthy", "sha256:1111"),
            agent("b", "healthy", "sha256:1111"),
        ]
        .into();
        let none = BTreeMap::new();
        let s = step(&mut r, &agents, &none, 1000);
        assert_eq!(s.events, ["ordered"]);
        assert_eq!(s.orders.len(), 1);
        assert_eq!(s.orders[0].agent, "a");
        let order = r.hosts[0].order.clone().unwrap();
        assert_eq!(order, "r1.0.a.1");
        // No answer yet: nothing more is sent (b is in the next wave).
        assert!(step(&mut r, &agents, &none, 1500).orders.is_empty());
        let answers: BTreeMap<_, _> = [(order.clone(), completed(&order))].into();
        agents.insert("a".into(), agent("a", "healthy", D2).1);
        let s = step(&mut r, &agents, &answers, 2000);
        assert_eq!(s.events, ["deployed", "baking"]);
        assert_eq!(r.wave, 0);
        assert!(step(&mut r, &agents, &answers, 3000).events.is_empty());
        let s = step(&mut r, &agents, &answers, 4000);
        assert_eq!(s.events, ["wave"]);
        assert_eq!(r.wave, 1);
        let s = step(&mut r, &agents, &answers, 4500);
        assert_eq!(s.orders[0].agent, "b");
        let order_b = r.hosts[1].order.clone().unwrap();
        let answers: BTreeMap<_, _> = [(order_b.clone(), completed(&order_b))].into();
        agents.insert("b".into(), agent("b", "healthy", D2).1);
        step(&mut r, &agents, &answers, 5000);
        let s = step(&mut r, &agents, &answers, 7000);
        assert_eq!(s.events, ["completed"]);
        assert_eq!(r.state, RolloutState::Completed);
    }

    #[test]
    fn a_failure_halts_and_later_waves_are_never_ordered() {
        let mut r = rollout(&["a", "b"], &[&["a"], &["b"]]);
        let agents: BTreeMap<_, _> = [
            agent("a", "healthy", "sha256:1111"),
            agent("b", "healthy", "sha256:1111"),
        ]
        .into();
        step(&mut r, &agents, &BTreeMap::new(), 1000);
        let order = r.hosts[0].order.clone().unwrap();
        let failed = Answer::Failed(DeployFailed {
            v: VERSION,
            agent: "a".into(),
            build: None,
            application: "app".into(),
            reference: r.reference.clone(),
            error: ErrorInfo::new(ErrorKind::Verification, "not healthy: app-broken"),
            rolled_back: true,
            running: Some("reg/app@sha256:1111".into()),
            order: Some(order.clone()),
            time: EventTime::UnixMs(0),
        });
        let s = step(&mut r, &agents, &[(order, failed)].into(), 2000);
        assert_eq!(s.events, ["failed", "halted"]);
        assert!(s.orders.is_empty());
        assert_eq!(r.state, RolloutState::Halted);
        assert!(
            r.reason
                .as_deref()
                .unwrap()
                .contains("a: not healthy: app-broken")
        );
        assert_eq!(r.hosts[1].state, HostState::Pending);
        assert!(
            step(&mut r, &agents, &BTreeMap::new(), 3000)
                .events
                .is_empty()
        );
    }

    #[test]
    fn a_deployed_host_that_turns_unhealthy_during_the_bake_halts_it() {
        let mut r = rollout(&["a", "b"], &[&["a"], &["b"]]);
        let mut agents: BTreeMap<_, _> = [
            agent("a", "healthy", D2),
            agent("b", "healthy", "sha256:1111"),
        ]
        .into();
        // a runs the image already: no order, straight to the bake.
        let s = step(&mut r, &agents, &BTreeMap::new(), 1000);
        assert_eq!(s.events, ["deployed", "baking"]);
        assert!(s.orders.is_empty());
        agents.insert("a".into(), agent("a", "unhealthy", D2).1);
        let s = step(&mut r, &agents, &BTreeMap::new(), 1500);
        assert_eq!(s.events, ["failed", "halted"]);
        // An order nobody answers fails after the deploy timeout.
        let mut r = rollout(&["b"], &[&["b"]]);
        step(&mut r, &agents, &BTreeMap::new(), 0);
        assert!(
            step(&mut r, &agents, &BTreeMap::new(), 60_000)
                .events
                .is_empty()
        );
        let s = step(&mut r, &agents, &BTreeMap::new(), 60_001);
        assert_eq!(s.events, ["failed", "halted"]);
        assert!(r.reason.unwrap().contains("no answer from b within 60 s"));
    }
}
