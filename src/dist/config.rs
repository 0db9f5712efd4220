//! A caller's `LionDistConfig`, checked before anything is built.

use crate::abi_types::*;
use crate::config::read_versioned;
use crate::status::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Sharded,
    Vote,
}

/// How the vote mode exchanges votes (`LionVoteExchange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exchange {
    /// An int8 reduce-scatter of the votes' sums, then an all-gather of the results, 5 a byte.
    Sums,
    /// An all-gather of every rank's 2-bit votes, counted locally.
    Gather,
}

/// Int8 sums of votes are exact up to this many ranks.
pub(crate) const MAX_RANKS_FOR_SUMS: usize = 127;

impl Exchange {
    /// The cheaper exchange for `world_size` ranks: (W-1)/4 bytes per parameter for the
    /// gather against 1.2 (W-1)/W for the sums, which cross at W = 4.8 (and sums stay exact
    /// up to 127 ranks).
    fn auto(world_size: usize) -> Exchange {
        if !(5..=MAX_RANKS_FOR_SUMS).contains(&world_size) {
            Exchange::Gather
        } else {
            Exchange::Sums
        }
    }
}

/// The transport a caller chose. The NCCL ones are read and checked here and joined by the
/// CUDA engine (`cuda::dist`); the CPU engine refuses them.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the NCCL fields: read by the CUDA engine
pub(crate) enum Join {
    Collectives(LionCollectives),
    NcclComm(*mut std::ffi::c_void),
    NcclUniqueId([u8; LION_NCCL_UNIQUE_ID_BYTES]),
}

#[derive(Clone, Copy)]
pub(crate) struct DistConfig {
    pub mode: Mode,
    pub rank: usize,
    pub world_size: usize,
    pub join: Join,
    pub nccl_library: *const std::ffi::c_char,
    pub exchange: Exchange,
}

/// Reads and validates a caller's `LionDistConfig` (and its `LionCollectives`).
///
/// # Safety
/// `ptr` is non-NULL and points to `struct_size` readable bytes; its pointers are NULL or
/// valid as the ABI says.
pub(crate) unsafe fn read_dist_config(ptr: *const LionDistConfig) -> Result<DistConfig> {
    let raw: LionDistConfig = read_versioned(ptr as *const u8, "LionDistConfig")?;
    let mode = match raw.mode {
        LION_DIST_SHARDED => Mode::Sharded,
        LION_DIST_VOTE => Mode::Vote,
        m => {
            return Err(Error::invalid(format!(
                "dist->mode: unknown LionDistMode {m}"
            )))
        }
    };
    if raw.world_size < 1 || raw.rank < 0 || raw.rank >= raw.world_size {
        return Err(Error::invalid(format!(
            "dist->rank {} and world_size {}: need 0 <= rank < world_size",
            raw.rank, raw.world_size
        )));
    }
    let world_size = raw.world_size as usize;
    let given = [
        !raw.collectives.is_null(),
        !raw.nccl_comm.is_null(),
        !raw.nccl_unique_id.is_null(),
    ];
    if given.iter().filter(|&&g| g).count() != 1 {
        return Err(Error::invalid(
            "dist: give exactly one transport: collectives, nccl_comm or nccl_unique_id",
        ));
    }
    let join = if !raw.collectives.is_null() {
        let table: LionCollectives =
            read_versioned(raw.collectives as *const u8, "LionCollectives")?;
        Join::Collectives(table)
    } else if !raw.nccl_comm.is_null() {
        Join::NcclComm(raw.nccl_comm)
    } else {
        let mut id = [0u8; LION_NCCL_UNIQUE_ID_BYTES];
        std::ptr::copy_nonoverlapping(raw.nccl_unique_id, id.as_mut_ptr(), id.len());
        Join::NcclUniqueId(id)
    };
    let exchange = match raw.vote_exchange {
        LION_VOTE_AUTO => Exchange::auto(world_size),
        LION_VOTE_SUMS if mode == Mode::Vote && world_size > MAX_RANKS_FOR_SUMS => {
            return Err(Error::invalid(format!(
                "dist->vote_exchange LION_VOTE_SUMS sums votes in int8, exact up to \
                 {MAX_RANKS_FOR_SUMS} ranks; world_size is {world_size}: use LION_VOTE_GATHER"
            )))
        }
        LION_VOTE_SUMS => Exchange::Sums,
        LION_VOTE_GATHER => Exchange::Gather,
        e => {
            return Err(Error::invalid(format!(
                "dist->vote_exchange: unknown LionVoteExchange {e}"
            )))
        }
    };
    Ok(DistConfig {
        mode,
        rank: raw.rank as usize,
        world_size,
        join,
        nccl_library: raw.nccl_library,
        exchange,
    })
}
