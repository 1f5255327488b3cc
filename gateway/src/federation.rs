//! The gateway's discovery member: started on `listen.discovery`, it advertises what the
//! desired state publishes for this cluster, and its view of the federation is one input
//! of the desired state. Its own counters become `strait_discovery_*` metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use anyhow::Context;
use strait_common::Config;
use strait_common::config::Discovery;
use strait_common::pki::Identity;
use strait_discovery::model::{MemberInfo, Service, ServiceKey};
use strait_discovery::node::{Node, NodeConfig};
use strait_discovery::state::{CatalogConfig, Voice};
use tokio::sync::watch;

use crate::desired::Desired;
use crate::metrics::{Desc, Registry};

const MEMBERS: Desc = Desc::gauge(
    "strait_discovery_members",
    &["state"],
    "Federation members known to this gateway, by state (alive, suspect, expired).",
);
const ENTRIES: Desc = Desc::gauge(
    "strait_discovery_catalog_entries",
    &[],
    "Services in the federated catalog (every origin, this one included).",
);
const ORIGIN_VERSION: Desc = Desc::gauge(
    "strait_discovery_origin_version",
    &["origin"],
    "Highest catalog entry version seen from each origin cluster.",
);
const BYTES: Desc = Desc::counter(
    "strait_discovery_bytes_total",
    &["direction"],
    "Gossip bytes (encoded messages), by direction (sent, received).",
);
const MESSAGES: Desc = Desc::counter(
    "strait_discovery_messages_total",
    &["direction"],
    "Gossip messages, by direction (sent, received).",
);
const REJECTED: Desc = Desc::counter(
    "strait_discovery_rejected_total",
    &["what"],
    "Gossip refused, by what (message: malformed or oversized; handshake: bad certificate; origin: an origin update its cluster did not sign).",
);
const LAG: Desc = Desc::gauge(
    "strait_discovery_convergence_lag_seconds",
    &[],
    "Age of the stalest heartbeat among alive members.",
);
/// The discovery member's metrics.
pub(crate) const METRICS: &[Desc] = &[
    MEMBERS,
    ENTRIES,
    ORIGIN_VERSION,
    BYTES,
    MESSAGES,
    REJECTED,
    LAG,
];

/// The discovery member of a gateway and its metrics.
#[derive(Clone)]
pub struct Federation {
    node: Arc<Node>,
    metrics: Registry,
}

impl Federation {
    /// Binds the gossip port and starts the member, advertising `tunnel` (or
    /// `discovery.advertise`) as this gateway's tunnel address and `published` as this
    /// cluster's services from its first round (a restarted member that gossiped before
    /// publishing would tell peers its new incarnation has no services).
    pub async fn start(
        config: &Config,
        d: &Discovery,
        identity: &Identity,
        tunnel: SocketAddr,
        published: BTreeMap<ServiceKey, Service>,
        metrics: &Registry,
    ) -> anyhow::Result<Federation> {
        let addr = config
            .listen
            .discovery
            .context("listen.discovery is required with discovery")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the discovery port {addr}"))?;
        let mut gossip_addr = listener.local_addr()?;
        let mut tunnel_addr = tunnel;
        if let Some(ip) = d.advertise {
            gossip_addr.set_ip(ip);
            tunnel_addr.set_ip(ip);
        }
        let me = MemberInfo {
            cluster: config.cluster.clone(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            tunnel_addr,
            gossip_addr,
        };
        let generation = start_generation();
        let replica = replica_name(config);
        let node_config = NodeConfig {
            interval: d.interval.0,
            fanout: d.fanout,
            seeds: d.seeds.clone(),
            catalog: CatalogConfig {
                lease: d.lease.0,
                phi_threshold: d.phi_threshold,
                min_heartbeat_interval: d.interval.0,
                // In Kubernetes mode a replica speaks for its cluster only once it knows
                // it should (the writer Lease) and has read the exports; replicas from
                // config files settle among themselves which one speaks.
                voice: match (&config.kubernetes, &replica) {
                    (Some(_), _) => Voice::Quiet,
                    (None, Some(_)) => Voice::Auto,
                    (None, None) => Voice::Speak,
                },
                accept_unsigned: d.accept_unsigned_origins,
                replica,
                ..Default::default()
            },
            ..Default::default()
        };
        let node = Node::start_with(
            me,
            generation,
            Arc::new(identity.clone()),
            listener,
            node_config,
            published,
        )?;
        metrics.describe(METRICS);
        Ok(Federation {
            node: Arc::new(node),
            metrics: metrics.clone(),
        })
    }

    /// The member.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Advertises what the desired state publishes for this cluster, until the gateway
    /// stops.
    pub async fn publish(self, mut desired: watch::Receiver<Arc<Desired>>) {
        loop {
            let d = desired.borrow_and_update().clone();
            self.node.set_local(d.published.clone());
            if desired.changed().await.is_err() {
                return;
            }
        }
    }

    /// Refreshes the discovery metrics from the member's view and counters.
    pub fn publish_metrics(&self) {
        let m = &self.metrics;
        let view = self.node.view();
        let count = |f: &dyn Fn(&strait_discovery::state::MemberView) -> bool| {
            view.members.iter().filter(|x| f(x)).count() as f64
        };
        m.gauge(&MEMBERS, &["alive"]).set(count(&|x| x.alive));
        m.gauge(&MEMBERS, &["suspect"])
            .set(count(&|x| !x.alive && !x.expired));
        m.gauge(&MEMBERS, &["expired"]).set(count(&|x| x.expired));
        m.gauge(&ENTRIES, &[]).set(view.services.len() as f64);
        for x in &view.members {
            m.gauge(&ORIGIN_VERSION, &[&x.info.cluster])
                .set(x.digest.version as f64);
        }
        let lag = view
            .members
            .iter()
            .filter(|x| x.alive)
            .map(|x| x.last_heard.as_secs_f64())
            .fold(0.0, f64::max);
        m.gauge(&LAG, &[]).set(lag);
        let st = self.node.stats();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        m.counter(&BYTES, &["sent"]).absolute(get(&st.bytes_sent));
        m.counter(&BYTES, &["received"])
            .absolute(get(&st.bytes_received));
        m.counter(&MESSAGES, &["sent"])
            .absolute(get(&st.messages_sent));
        m.counter(&MESSAGES, &["received"])
            .absolute(get(&st.messages_received));
        m.counter(&REJECTED, &["message"])
            .absolute(get(&st.rejected_messages));
        m.counter(&REJECTED, &["handshake"])
            .absolute(get(&st.rejected_handshakes));
        m.counter(&REJECTED, &["origin"])
            .absolute(get(&st.rejected_origins));
    }
}

/// This start's generation: the start time in microseconds, its lowest ten bits random.
/// A restart outranks the previous incarnation (restarts are more than a millisecond
/// apart), and replicas that start in the same instant still differ: the newest of a
/// cluster's replicas speaks for it, so two must never share a generation.
fn start_generation() -> u64 {
    use rand::Rng;
    let micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    (micros & !0x3ff) | rand::rng().random_range(0..0x400)
}

/// This gateway's name among its cluster's replicas (`discovery.replica`), or `None` for a
/// cluster's only gateway. Opt-in, in Kubernetes mode too: a replica advertises its own
/// tunnel address, and pods behind one load balancer address would all claim the same.
pub fn replica_name(config: &Config) -> Option<String> {
    config.discovery.as_ref()?.replica.clone()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use strait_common::GatewayId;

    use super::*;
    use crate::desired::{CatalogFaults, published};

    #[tokio::test]
    async fn a_new_member_publishes_its_services_before_its_first_round() {
        let pki = strait_tests::TestPki::new();
        pki.write("east", &pki.issue("east"));
        let mut config = pki.config("east", "127.0.0.1:7400".parse().unwrap());
        config.exports.push(strait_tests::export(
            "web",
            80,
            "127.0.0.1:8080".parse().unwrap(),
            &["*"],
        ));
        let d = strait_tests::discovery(&[], Duration::from_secs(30));
        let tls = &config.tls;
        let identity = Identity::load(
            &tls.ca,
            &tls.cert,
            &tls.key,
            &GatewayId::new(strait_tests::TD, "east"),
        )
        .unwrap();
        let services = published(&config.exports, "", &CatalogFaults::default());
        let f = Federation::start(
            &config,
            &d,
            &identity,
            config.listen.tunnel,
            services,
            &Registry::new(),
        )
        .await
        .unwrap();
        // Its catalog held them before its tasks were spawned.
        let own: Vec<String> = f
            .node()
            .view()
            .services
            .iter()
            .filter(|e| e.origin.cluster == "east")
            .map(|e| e.key.to_string())
            .collect();
        assert_eq!(own, vec!["default/web"]);
        f.node().stop();
    }
}
