use clap::Parser;

fn main() {
    let cli = kiln::cli::Cli::parse();
    kiln::cli::init_logging(cli.verbose, cli.quiet);
    let code = match kiln::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    };
    std::process::exit(code);
}
