//! The render stage: load the recipe (git recipes checked out again by commit on this host,
//! inline recipes written to a temp project directory), render its templates within the
//! operator's limits, validate it, and start the build's [`Artifacts`].

use super::source::checked_paths;
use super::{Artifacts, Handover, StageError, StageRun, StageWork, refused};
use crate::bus::{self, RecipeSource};
use crate::recipe::schema::RootfsBase;
use crate::recipe::{LoadOptions, Loaded};
use serde::Serialize;

pub struct RenderStage;

/// What the render stage made: the recipe's inputs digest and name.
#[derive(Debug, Clone, Serialize)]
pub struct RenderOut {
    pub inputs: String,
    pub name: String,
    /// The loaded recipe, handed on (not in the message's outputs).
    #[serde(skip)]
    loaded: Option<Box<Loaded>>,
}

impl StageWork for RenderStage {
    const STAGE: bus::Stage = bus::Stage::Render;
    type Output = RenderOut;

    fn run(run: &mut StageRun<'_>, h: &Handover) -> Result<RenderOut, StageError> {
        let loaded = load(run, h)?;
        check_supported(&loaded)?;
        // The accelerator probe of the verify stage runs beside the stages in between.
        super::verify::probe_ahead(run.env, &h.request, &loaded);
        Ok(RenderOut {
            inputs: loaded.inputs.clone(),
            name: loaded.recipe.name.clone(),
            loaded: Some(Box::new(loaded)),
        })
    }

    fn apply(h: &mut Handover, out: &RenderOut) {
        if let Some(loaded) = &out.loaded {
            h.build = Some(Artifacts::new((**loaded).clone()));
        }
    }
}

fn load(run: &StageRun<'_>, h: &Handover) -> Result<Loaded, StageError> {
    let env = run.env;
    let access = &env.access;
    let request = &h.request;
    let set: Vec<(String, String)> = request
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Recipes see only the environment variables this host's operator allowed.
    let vars = Some(access.env_values());
    let limits = env.limits.clone();
    let load = |path: &std::path::Path, opts: &LoadOptions| {
        crate::recipe::load(path, opts).map_err(|d| StageError::Recipe(Box::new(d)))
    };
    let (recipe_path, templates_dir) = checked_paths(access, request)?;
    match &request.recipe {
        RecipeSource::Path { .. } => load(
            recipe_path
                .as_deref()
                .ok_or(StageError::Missing("source"))?,
            &LoadOptions {
                set,
                templates_dir,
                env: vars,
                limits,
                ..Default::default()
            },
        ),
        RecipeSource::Inline { inline, name } => {
            let dir =
                tempfile::tempdir().map_err(super::io("creating a directory for the recipe"))?;
            let file_name = std::path::Path::new(name)
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "recipe.yaml".into());
            let path = dir.path().join(file_name);
            std::fs::write(&path, inline).map_err(super::io("writing the inline recipe"))?;
            load(
                &path,
                &LoadOptions {
                    set,
                    env: vars,
                    limits,
                    ..Default::default()
                },
            )
        }
        RecipeSource::Git { git } => {
            access.check_git(&git.url, &env.home).map_err(refused)?;
            let commit = h.commit.clone().ok_or(StageError::Missing("source"))?;
            let checkout = crate::source::GitMirror::with_home(&git.url, &env.home)
                .and_then(|s| s.checkout(&commit, &git.path))
                .map_err(StageError::Source)?;
            let mut opts = crate::source::load_options_for(&checkout, set);
            opts.git.reference = git.git_ref.clone();
            opts.env = vars;
            opts.limits = limits;
            load(&checkout.recipe_path, &opts)
        }
    }
}

/// The checks a recipe must pass before its stages can run.
pub fn check_supported(loaded: &Loaded) -> Result<(), StageError> {
    if loaded.recipe.kernel.build.is_some() && loaded.recipe.rootfs.base != RootfsBase::Busybox {
        return Err(StageError::Unsupported(
            "kernel.build with rootfs.base: debian (a Debian image boots the kernel of its own packages)"
                .into(),
        ));
    }
    Ok(())
}
