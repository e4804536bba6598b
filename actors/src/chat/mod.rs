//! The chat-run family (`/ws`): the [`RunRegistry`](run_registry::RunRegistry)
//! supervisor, one [`ProviderRun`](provider_run::ProviderRun) per live agent
//! CLI process, and one [`ChatSocket`](chat_socket::ChatSocket) per
//! connection. [`history`] is what the registry records of each
//! conversation for the web UI.

pub mod chat_socket;
pub mod history;
pub mod provider_run;
pub mod run_registry;

#[cfg(test)]
mod registry_model;
