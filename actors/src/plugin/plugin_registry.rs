//! `PluginRegistry`: the directory of plugins.
//!
//! Owns: every discovered plugin by name, with its host's address (enabled
//! plugins only) and the last status that host reported. Discovery runs
//! once, in `started()`; it starts one [`PluginHost`] per enabled plugin.
//!
//! Handles: [`LookupPort`] (the upgrade route, once per client socket; the
//! answer carries a signal that fires before the plugin is stopped on purpose),
//! [`ListPlugins`], [`StartPlugin`], [`StopPlugin`] (REST),
//! [`StopAllPlugins`] (gateway shutdown), and [`HostStatusChanged`] from its
//! hosts.
//!
//! Sends: [`StartServer`] / [`StopServer`] to hosts; it never waits on a
//! host inside a handler (those replies run as separate futures), and hosts
//! never ask it anything, so no cycle can deadlock.
//!
//! Stops: with the actor system; each host then kills its server.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::watch;

use super::manifest::{discover, PluginManifest};
use super::plugin_host::{HostStatusChanged, PluginHost, StartServer, StopServer};
use super::{PluginState, PluginStatus};
use crate::config::GatewayConfig;

/// Sent by the `/plugin-ws/{name}` route before upgrading: where the
/// plugin's server listens if it is ready, else `None` (close 4404).
#[derive(Message, Debug)]
#[rtype(result = "Option<PluginPort>")]
pub struct LookupPort {
    pub name: String,
}

/// Answer to [`LookupPort`].
#[derive(Debug)]
pub struct PluginPort {
    pub port: u16,
    /// Changes when the plugin is stopped on purpose (REST stop, gateway
    /// shutdown): its proxies then close their clients with 1001.
    pub going_away: watch::Receiver<()>,
}

/// Sent by `GET /api/plugins`: every plugin, sorted by name.
#[derive(Message, Debug)]
#[rtype(result = "Vec<PluginStatus>")]
pub struct ListPlugins;

/// Sent by `POST /api/plugins/{name}/start`: start (or restart now) a
/// plugin's server; answers once it is ready or failed.
#[derive(Message, Debug)]
#[rtype(result = "Result<PluginStatus, PluginError>")]
pub struct StartPlugin {
    pub name: String,
}

/// Sent by `POST /api/plugins/{name}/stop`: stop a plugin's server and keep
/// it stopped; answers once it has exited.
#[derive(Message, Debug)]
#[rtype(result = "Result<PluginStatus, PluginError>")]
pub struct StopPlugin {
    pub name: String,
}

/// Sent by the gateway's shutdown sequence: stop every plugin server
/// (SIGTERM, SIGKILL after the grace period); answers when all have exited.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopAllPlugins;

/// Why a REST start/stop was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {0:?} not found")]
    NotFound(String),
    #[error("plugin {0:?} is disabled in its manifest")]
    Disabled(String),
    #[error("plugin host unavailable: {0}")]
    Unavailable(String),
}

struct Entry {
    /// `None` for disabled plugins.
    host: Option<Addr<PluginHost>>,
    /// Last status the host reported (or the idle status).
    status: PluginStatus,
    /// Signalled before the server is stopped on purpose; see [`PluginPort`].
    going_away: watch::Sender<()>,
}

pub struct PluginRegistry {
    config: Arc<GatewayConfig>,
    plugins: BTreeMap<String, Entry>,
    /// Open `/plugin-ws` proxies (for the admin snapshot), by proxy id:
    /// told by each proxy as it attaches and stops.
    proxies: BTreeMap<u64, (String, String, tokio::time::Instant)>,
}

/// From a `PluginProxy` attached to its plugin: (id, plugin, user).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ProxyOpened {
    pub id: u64,
    pub plugin: String,
    pub user: String,
}

/// From a `PluginProxy` that stopped.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ProxyClosed {
    pub id: u64,
}

/// Admin snapshot: the open plugin proxies.
#[derive(Message, Debug)]
#[rtype(result = "Vec<ProxyInfo>")]
pub struct ListProxies;

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyInfo {
    pub id: u64,
    pub plugin: String,
    pub user: String,
    pub age_secs: u64,
}

impl Handler<ProxyOpened> for PluginRegistry {
    type Result = ();

    fn handle(&mut self, msg: ProxyOpened, _: &mut Self::Context) {
        self.proxies
            .insert(msg.id, (msg.plugin, msg.user, tokio::time::Instant::now()));
    }
}

impl Handler<ProxyClosed> for PluginRegistry {
    type Result = ();

    fn handle(&mut self, msg: ProxyClosed, _: &mut Self::Context) {
        self.proxies.remove(&msg.id);
    }
}

impl Handler<ListProxies> for PluginRegistry {
    type Result = MessageResult<ListProxies>;

    fn handle(&mut self, _: ListProxies, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.proxies
                .iter()
                .map(|(id, (plugin, user, since))| ProxyInfo {
                    id: *id,
                    plugin: plugin.clone(),
                    user: user.clone(),
                    age_secs: since.elapsed().as_secs(),
                })
                .collect(),
        )
    }
}

impl PluginRegistry {
    pub fn new(config: Arc<GatewayConfig>) -> Self {
        PluginRegistry {
            config,
            plugins: BTreeMap::new(),
            proxies: BTreeMap::new(),
        }
    }

    fn add(&mut self, manifest: PluginManifest, ctx: &mut Context<Self>) {
        let status = PluginStatus::idle(&manifest);
        let host = manifest.enabled.then(|| {
            let registry = ctx.address().downgrade().recipient();
            PluginHost::new(manifest.clone(), &self.config.child_env, registry).start()
        });
        if host.is_none() {
            tracing::info!(plugin = %manifest.name, "plugin disabled in its manifest; not started");
        }
        let entry = Entry {
            host,
            status,
            going_away: watch::Sender::new(()),
        };
        self.plugins.insert(manifest.name.clone(), entry);
    }

    fn host(&self, name: &str) -> Result<Addr<PluginHost>, PluginError> {
        let entry = self
            .plugins
            .get(name)
            .ok_or_else(|| PluginError::NotFound(name.to_string()))?;
        entry
            .host
            .clone()
            .ok_or_else(|| PluginError::Disabled(name.to_string()))
    }
}

impl Actor for PluginRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let manifests = discover(&self.config.data_dir);
        tracing::info!(
            event = "actor.started",
            actor = "PluginRegistry",
            plugins = manifests.len(),
            "actor started"
        );
        for manifest in manifests {
            self.add(manifest, ctx);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::info!(
            event = "actor.stopped",
            actor = "PluginRegistry",
            reason = "system stopped",
            "actor stopped"
        );
    }
}

impl Handler<HostStatusChanged> for PluginRegistry {
    type Result = ();

    fn handle(&mut self, msg: HostStatusChanged, _ctx: &mut Self::Context) {
        if let Some(entry) = self.plugins.get_mut(&msg.0.name) {
            entry.status = msg.0;
        }
    }
}

impl Handler<LookupPort> for PluginRegistry {
    type Result = Option<PluginPort>;

    fn handle(&mut self, msg: LookupPort, _ctx: &mut Self::Context) -> Option<PluginPort> {
        let entry = self.plugins.get(&msg.name)?;
        if entry.status.state != PluginState::Running {
            return None;
        }
        Some(PluginPort {
            port: entry.status.port?,
            going_away: entry.going_away.subscribe(),
        })
    }
}

impl Handler<ListPlugins> for PluginRegistry {
    type Result = Vec<PluginStatus>;

    fn handle(&mut self, _msg: ListPlugins, _ctx: &mut Self::Context) -> Vec<PluginStatus> {
        self.plugins.values().map(|e| e.status.clone()).collect()
    }
}

impl Handler<StartPlugin> for PluginRegistry {
    type Result = ResponseFuture<Result<PluginStatus, PluginError>>;

    fn handle(&mut self, msg: StartPlugin, _ctx: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.name);
        Box::pin(async move {
            host?
                .send(StartServer)
                .await
                .map_err(|e| PluginError::Unavailable(e.to_string()))
        })
    }
}

impl Handler<StopPlugin> for PluginRegistry {
    type Result = ResponseFuture<Result<PluginStatus, PluginError>>;

    fn handle(&mut self, msg: StopPlugin, _ctx: &mut Self::Context) -> Self::Result {
        let host = self.host(&msg.name);
        if let (Ok(_), Some(entry)) = (&host, self.plugins.get(&msg.name)) {
            entry.going_away.send_replace(());
        }
        Box::pin(async move {
            host?
                .send(StopServer)
                .await
                .map_err(|e| PluginError::Unavailable(e.to_string()))
        })
    }
}

impl Handler<StopAllPlugins> for PluginRegistry {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: StopAllPlugins, _ctx: &mut Self::Context) -> Self::Result {
        for entry in self.plugins.values() {
            entry.going_away.send_replace(());
        }
        let hosts: Vec<Addr<PluginHost>> = self
            .plugins
            .values()
            .filter_map(|e| e.host.clone())
            .collect();
        tracing::info!(
            actor = "PluginRegistry",
            plugins = hosts.len(),
            "stopping all plugin servers"
        );
        Box::pin(async move {
            futures_util::future::join_all(hosts.iter().map(|h| h.send(StopServer))).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::plugin::manifest::{MANIFEST_FILE, PLUGINS_DIR};

    /// Longest a test waits for a status it expects.
    const WAIT: Duration = Duration::from_secs(15);

    fn temp_root(test: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("agentgate-registry-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(PLUGINS_DIR)).unwrap();
        root
    }

    /// A plugin whose server is the shell script `script`.
    fn write_plugin(root: &Path, name: &str, script: &str, enabled: bool) {
        let dir = root.join(PLUGINS_DIR).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let run = dir.join("run.sh");
        std::fs::write(&run, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let manifest = serde_json::json!({"name": name, "server": "run.sh", "enabled": enabled});
        std::fs::write(dir.join(MANIFEST_FILE), manifest.to_string()).unwrap();
    }

    fn start(root: &Path) -> Addr<PluginRegistry> {
        PluginRegistry::new(Arc::new(GatewayConfig::for_tests(root.to_path_buf()))).start()
    }

    async fn status(reg: &Addr<PluginRegistry>, name: &str) -> PluginStatus {
        let all = reg.send(ListPlugins).await.unwrap();
        all.into_iter().find(|s| s.name == name).unwrap()
    }

    /// Polls the registry until `name`'s status satisfies `ok` (bounded by [`WAIT`]).
    async fn wait_for(
        reg: &Addr<PluginRegistry>,
        name: &str,
        ok: impl Fn(&PluginStatus) -> bool,
    ) -> PluginStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let s = status(reg, name).await;
            if ok(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out; last status {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(pid: u32) -> bool {
        crate::kill::exists(pid as i32)
    }

    /// A server that announces a port (held open by the test) runs; killed,
    /// it is restarted by itself; stopped over REST it stays down; started
    /// again it is back.
    #[actix_rt::test]
    async fn a_crashed_server_is_restarted_and_a_stopped_one_stays_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let root = temp_root("lifecycle");
        let script =
            format!("echo booting\necho '{{\"ready\":true,\"port\":{port}}}'\nexec sleep 600");
        write_plugin(&root, "sleeper", &script, true);
        let reg = start(&root);

        let first = wait_for(&reg, "sleeper", |s| s.running).await;
        assert_eq!(first.port, Some(port));
        assert_eq!(first.restarts, 0);
        let pid = first.pid.unwrap();
        assert_eq!(
            reg.send(LookupPort {
                name: "sleeper".into()
            })
            .await
            .unwrap()
            .map(|p| p.port),
            Some(port)
        );

        crate::kill::signal_process(pid as i32, crate::kill::Signal::KILL);
        let second = wait_for(&reg, "sleeper", |s| s.running && s.pid != Some(pid)).await;
        assert_eq!(second.restarts, 1);
        assert!(
            second.last_error.as_deref().unwrap().contains("SIGKILL"),
            "{second:?}"
        );

        let stopped = reg
            .send(StopPlugin {
                name: "sleeper".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stopped.state, PluginState::Stopped);
        assert!(!alive(second.pid.unwrap()));
        assert_eq!(
            reg.send(LookupPort {
                name: "sleeper".into()
            })
            .await
            .unwrap()
            .map(|p| p.port),
            None
        );

        let started = reg
            .send(StartPlugin {
                name: "sleeper".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(started.state, PluginState::Running);
        reg.send(StopAllPlugins).await.unwrap();
        assert!(!alive(started.pid.unwrap()));
        assert_eq!(status(&reg, "sleeper").await.state, PluginState::Stopped);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Servers that exit at once, or announce a port nobody listens on, are
    /// reported with the reason and retried; a disabled plugin is listed and
    /// never started; unknown names are refused.
    #[actix_rt::test]
    async fn broken_servers_are_reported_and_retried() {
        let root = temp_root("broken");
        write_plugin(&root, "quitter", "echo bye >&2\nexit 3", true);
        write_plugin(
            &root,
            "liar",
            "echo '{\"ready\":true,\"port\":1}'\nexec sleep 600",
            true,
        );
        write_plugin(&root, "off", "exit 0", false);
        let reg = start(&root);

        let quitter = wait_for(&reg, "quitter", |s| s.restarts >= 1).await;
        assert!(!quitter.running);
        let err = quitter.last_error.unwrap();
        assert!(
            err.contains("exit status: 3") && err.contains("before announcing"),
            "{err}"
        );

        let liar = wait_for(&reg, "liar", |s| s.last_error.is_some()).await;
        assert!(!liar.running);
        assert!(liar
            .last_error
            .unwrap()
            .contains("nothing accepts connections"));

        let off = status(&reg, "off").await;
        assert_eq!(
            (off.state, off.enabled, off.pid),
            (PluginState::Disabled, false, None)
        );
        assert_eq!(
            reg.send(StartPlugin { name: "off".into() }).await.unwrap(),
            Err(PluginError::Disabled("off".into()))
        );
        assert_eq!(
            reg.send(StopPlugin {
                name: "nope".into()
            })
            .await
            .unwrap(),
            Err(PluginError::NotFound("nope".into()))
        );
        reg.send(StopAllPlugins).await.unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
