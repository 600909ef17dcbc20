//! The `sluice` binary: CLI only. `serve`, `check-config`, `version`.
//!
//! Every configuration key is a flag `--<section>-<key> VALUE`, generated from
//! `sluice::config::Config::keys()`, so the flags, the `SLUICE_*` environment variables and the
//! TOML file always name the same keys.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches, Parser, Subcommand};
use sluice::config::{Config, ConfigError};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration that does not load (clap uses the same for bad usage).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "sluice", version, about = "A thread-per-core WebRTC SFU")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the SFU (defaults < --config file < SLUICE_<SECTION>_<KEY> env < flags).
    Serve(ConfigArgs),
    /// Print the effective configuration as TOML and exit 0, or print every error and exit 2.
    CheckConfig(ConfigArgs),
    /// Print the version (and the git commit it was built from, when known).
    Version,
    /// Mint a token (HS256 JWT) from the configured auth.jwt_secret, for WHIP, WHEP and /ws.
    Token(TokenArgs),
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The room or stream the token is for; "*" for every one.
    #[arg(long)]
    room: String,
    /// The identity (`sub` claim).
    #[arg(long)]
    identity: String,
    /// Grant publishing (WHIP, publishing in a room).
    #[arg(long)]
    publish: bool,
    /// Grant subscribing (WHEP, receiving in a room).
    #[arg(long)]
    subscribe: bool,
    /// Lifetime: seconds, or a number with s, m, h or d (e.g. 1h).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: u64,
    #[command(flatten)]
    config: ConfigArgs,
}

/// "90", "90s", "15m", "1h", "7d" to seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 3600, 90s, 15m, 1h or 7d"))?;
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("{s:?} must be a positive duration")),
        Some(v) => Ok(v),
    }
}

/// `--config PATH` plus one flag per configuration key, from `Config::keys()`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ConfigArgs {
    config: Option<PathBuf>,
    /// (dotted key, value) for every key flag given.
    overrides: Vec<(String, String)>,
}

/// clap needs `'static` names; the flags are built once per process.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

impl Args for ConfigArgs {
    fn augment_args(mut cmd: Command) -> Command {
        cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .short('c')
                .value_name("PATH")
                .env("SLUICE_CONFIG")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML configuration file (without one, built-in defaults)"),
        );
        for spec in Config::keys() {
            let default = spec
                .default_repr()
                .filter(|d| !d.is_empty())
                .map(|d| format!(" [default: {d}]"))
                .unwrap_or_default();
            let help = format!("{}{default} [env: {}]", spec.help, spec.env_var());
            cmd = cmd.arg(
                Arg::new(leak(spec.dotted()))
                    .long(leak(spec.flag()))
                    .value_name(spec.value_name)
                    .help(leak(help))
                    .help_heading(leak(format!("[{}] options", spec.section)))
                    .action(ArgAction::Set),
            );
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ConfigArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = ConfigArgs::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>("config") {
            self.config = Some(path.clone());
        }
        for spec in Config::keys() {
            let id = spec.dotted();
            if let Some(value) = matches.get_one::<String>(&id) {
                self.overrides.retain(|(k, _)| *k != id);
                self.overrides.push((id, value.clone()));
            }
        }
        Ok(())
    }
}

impl ConfigArgs {
    /// Loads the configuration from the file, the process environment and the flags.
    fn load(&self) -> Result<Config, Vec<ConfigError>> {
        // `std::env::vars()` panics on non-UTF-8 entries; only SLUICE_* matter here.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                k.starts_with("SLUICE_")
                    .then(|| (k, v.to_string_lossy().into_owned()))
            })
            .collect();
        Config::load(self.config.as_deref(), &env, &self.overrides)
    }
}

fn version() -> String {
    match option_env!("SLUICE_GIT_COMMIT") {
        Some(commit) if !commit.is_empty() => {
            format!("sluice {} ({commit})", env!("CARGO_PKG_VERSION"))
        }
        _ => format!("sluice {}", env!("CARGO_PKG_VERSION")),
    }
}

fn print_errors(errors: &[ConfigError]) {
    for e in errors {
        eprintln!("{e}");
    }
}

/// Changes the log filter of the running process (SIGHUP reload of `log.level`).
type LogReload = sluice::serve::SetLogLevel;

/// `RUST_LOG` when set (and valid), else `log.level` (validated by `Config::load`). Returns the
/// handle that changes `log.level` later; while `RUST_LOG` is set it wins and reloads say so.
fn init_logging(config: &Config) -> LogReload {
    use tracing_subscriber::prelude::*;
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let mut rust_log_error = None;
    let pinned_by_env = from_env.is_some();
    let filter = match from_env {
        Some(directives) => EnvFilter::builder().parse(&directives).unwrap_or_else(|e| {
            rust_log_error = Some(format!("ignoring RUST_LOG={directives:?}: {e}"));
            EnvFilter::new(&config.log.level)
        }),
        None => EnvFilter::new(&config.log.level),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    if let Some(message) = rust_log_error {
        tracing::warn!("{message}");
    }
    Box::new(move |level: &str| {
        if pinned_by_env {
            return Err("RUST_LOG is set and takes precedence".into());
        }
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Token(t) => {
            let config = match t.config.load() {
                Ok(config) => config,
                Err(errors) => {
                    print_errors(&errors);
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let Some(secret) = config.auth.jwt_secret else {
                eprintln!("sluice token: auth.jwt_secret is not set (config file, SLUICE_AUTH_JWT_SECRET or --auth-jwt-secret)");
                return ExitCode::from(EXIT_CONFIG);
            };
            if !t.publish && !t.subscribe {
                eprintln!("sluice token: grant at least one of --publish and --subscribe");
                return ExitCode::from(EXIT_CONFIG);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let claims = sluice::control::auth::Claims::new(
                &t.identity,
                &t.room,
                t.publish,
                t.subscribe,
                now,
                t.ttl,
            );
            println!(
                "{}",
                sluice::control::auth::mint(secret.as_bytes(), &claims)
            );
            ExitCode::SUCCESS
        }
        Cmd::Version => {
            println!("{}", version());
            ExitCode::SUCCESS
        }
        Cmd::CheckConfig(args) => match args.load() {
            Ok(config) => {
                print!("{}", config.to_toml_redacted());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                print_errors(&errors);
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Cmd::Serve(args) => {
            let config = match args.load() {
                Ok(config) => config,
                Err(errors) => {
                    print_errors(&errors);
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let set_log_level = init_logging(&config);
            tracing::info!(
                version = %version(),
                config = args.config.as_ref().map_or("(defaults)".into(), |p| p.display().to_string()),
                shards = config.effective_shards(),
                "starting"
            );
            let source = args.clone();
            let hooks = sluice::serve::Hooks {
                reload_config: Box::new(move || source.load()),
                set_log_level,
            };
            match sluice::serve::run(config, hooks) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("fatal: {e}");
                    eprintln!("sluice: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_key_has_a_flag() {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for spec in Config::keys() {
            let flag = spec.flag();
            assert!(
                serve
                    .get_arguments()
                    .any(|a| a.get_long() == Some(flag.as_str())),
                "--{flag} missing"
            );
        }
    }

    #[test]
    fn flags_become_overrides() {
        let cli = parse(&[
            "serve",
            "--config",
            "/etc/sluice/sluice.toml",
            "--http-listen",
            "127.0.0.1:18080",
            "--media-port-base",
            "41000",
            "--media-listen-ips",
            "127.0.0.1,10.0.0.5",
        ])
        .unwrap();
        let Cmd::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.config, Some("/etc/sluice/sluice.toml".into()));
        let mut overrides = args.overrides.clone();
        overrides.sort();
        assert_eq!(
            overrides,
            [
                ("http.listen".to_string(), "127.0.0.1:18080".to_string()),
                (
                    "media.listen_ips".to_string(),
                    "127.0.0.1,10.0.0.5".to_string()
                ),
                ("media.port_base".to_string(), "41000".to_string()),
            ]
        );
        let config = Config::load(None, &[], &args.overrides).unwrap();
        assert_eq!(config.media.port_base, 41000);
        assert_eq!(config.media.listen_ips.len(), 2);
    }

    #[test]
    fn check_config_takes_the_same_flags_and_no_flags_means_defaults() {
        let cli = parse(&["check-config", "--media-shards", "1"]).unwrap();
        assert!(
            matches!(cli.command, Cmd::CheckConfig(ref a) if a.overrides == [("media.shards".to_string(), "1".to_string())])
        );
        let cli = parse(&["serve"]).unwrap();
        let Cmd::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.config, None);
        assert!(args.overrides.is_empty());
        assert!(parse(&["serve", "--media-port-bsae", "1"]).is_err());
        assert!(matches!(parse(&["version"]).unwrap().command, Cmd::Version));
    }

    #[test]
    fn ttl_parses_units() {
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("15m").unwrap(), 900);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("2d").unwrap(), 172_800);
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn version_names_the_package_version() {
        assert!(version().starts_with(&format!("sluice {}", env!("CARGO_PKG_VERSION"))));
    }
}
