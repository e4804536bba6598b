//! Claude Code CLI adapter (stub, filled in below).
use super::*;
pub struct Claude;
impl Provider for Claude {
    fn kind(&self) -> ProviderKind { ProviderKind::Claude }
    fn command(&self, turn: &Turn) -> CommandSpec { CommandSpec::new(&turn.bin) }
    fn parser(&self, _turn: &Turn) -> Box<dyn LineParser> { unimplemented!() }
}
