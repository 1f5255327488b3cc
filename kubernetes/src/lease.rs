//! One writer among the gateway replicas of a cluster: a `coordination.k8s.io` Lease.
//! The holder renews it every third of its duration; another replica takes it over once
//! it has gone unrenewed for the whole duration. Every replica serves traffic; only the
//! holder writes `ServiceExport` status and the imported objects.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::watch::Health;

/// The Lease's name in the gateway's namespace.
pub const LEASE_NAME: &str = "strait-gateway-writer";

/// Who holds the writer Lease, as this replica knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// This replica: it writes.
    Me,
    /// Another replica, alive.
    Other,
    /// Not known (the API server cannot be reached, or nobody holds it yet).
    Unknown,
}

/// Holds or watches for the Lease for as long as it runs, publishing on `holder` who
/// holds it.
pub async fn run(
    client: Client,
    namespace: String,
    me: String,
    duration: Duration,
    holder: watch::Sender<Holder>,
    health: Health,
) {
    let api = Api::<Lease>::namespaced(client, &namespace);
    let mut tick = tokio::time::interval(duration / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        // Counted from when the request went out: the Lease's renewTime is no later.
        let sent = tokio::time::Instant::now();
        let attempt = tokio::time::timeout(duration / 3, try_hold(&api, &me, duration)).await;
        let attempt =
            attempt.unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into())));
        let now = match attempt {
            Ok(true) => {
                health.report("lease", Vec::new());
                renewed = Some(sent);
                Holder::Me
            }
            Ok(false) => {
                health.report("lease", Vec::new());
                renewed = None;
                Holder::Other
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the writer Lease failed");
                health.report("lease", vec![format!("the writer Lease: {e}")]);
                // Still the holder until the Lease could expire for the others (with a
                // third of it to spare for clocks and a pass in flight).
                if renewed.is_some_and(|at| at.elapsed() < duration * 2 / 3) {
                    Holder::Me
                } else {
                    renewed = None;
                    Holder::Unknown
                }
            }
        };
        if holder.send_if_modified(|cur| std::mem::replace(cur, now) != now) {
            tracing::info!(replica = %me, holder = ?now, "writer Lease changed hands");
        }
        health.set_leader(now == Holder::Me);
    }
}

/// Takes, renews or leaves the Lease; whether `me` holds it afterwards.
async fn try_hold(api: &Api<Lease>, me: &str, duration: Duration) -> kube::Result<bool> {
    let now = Timestamp::now();
    let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                labels: Some(crate::imports::owned_labels()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.into()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(me);
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let held_for =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(seconds)));
        t.0 + held_for < now
    });
    if !mine && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(me.into());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds);
    // The resourceVersion read above makes this a compare-and-swap: of two replicas
    // taking an expired Lease at once, one gets 409 Conflict.
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
