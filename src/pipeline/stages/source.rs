//! The source stage: resolve the request's recipe — a git checkout pinned to its commit, a path
//! that must exist on this host (inside the operator's recipe roots), or inline text — and check
//! that everything the request names is open to requests on this host.

use super::{Handover, StageError, StageRun, StageWork, refused};
use crate::bus::{self, BuildRequest, RecipeSource};
use serde::Serialize;
use std::path::PathBuf;

pub struct SourceStage;

/// Where the recipe came from.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum SourceOut {
    Path { path: PathBuf },
    Inline { inline: String },
    Git { commit: String, time: i64 },
}

impl StageWork for SourceStage {
    const STAGE: bus::Stage = bus::Stage::Source;
    type Output = SourceOut;

    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<SourceOut, StageError> {
        let env = run.env;
        checked_paths(&env.access, &h.request)?;
        Ok(match &h.request.recipe {
            RecipeSource::Path { path } => {
                if !path.is_file() {
                    return Err(StageError::NoRecipe(path.clone()));
                }
                SourceOut::Path { path: path.clone() }
            }
            RecipeSource::Inline { name, .. } => SourceOut::Inline {
                inline: name.clone(),
            },
            RecipeSource::Git { git } => {
                env.access.check_git(&git.url, &env.home).map_err(refused)?;
                let checkout = crate::source::GitMirror::with_home(&git.url, &env.home)
                    .and_then(|s| s.checkout(&git.git_ref, &git.path))
                    .map_err(StageError::Source)?;
                SourceOut::Git {
                    commit: checkout.commit.clone(),
                    time: checkout.time,
                }
            }
        })
    }

    fn apply(h: &mut Handover, out: &SourceOut) {
        if let SourceOut::Git { commit, time } = out {
            h.commit = Some(commit.clone());
            h.time = Some(*time);
        }
    }
}

/// The request's recipe file and templates directory, checked against the recipe roots.
pub(super) fn checked_paths(
    access: &crate::pipeline::access::RecipeAccess,
    request: &BuildRequest,
) -> Result<(Option<PathBuf>, Option<PathBuf>), StageError> {
    let recipe = match &request.recipe {
        RecipeSource::Path { path } => Some(access.check_path("recipe", path).map_err(refused)?),
        _ => None,
    };
    let templates = match &request.templates {
        Some(t) => Some(
            access
                .check_path("templates directory", t)
                .map_err(refused)?,
        ),
        None => None,
    };
    Ok((recipe, templates))
}
