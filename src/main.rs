use clap::Parser;

fn main() {
    // Serve a render request when started as a render child; else render in children.
    kiln::recipe::sandbox::serve_or_enable();
    let cli = kiln::cli::Cli::parse();
    kiln::cli::init_logging(cli.verbose, cli.quiet);
    let code = match kiln::cli::run(cli) {
        Ok(code) => code,
        Err(err) => kiln::cli::fail(&err),
    };
    std::process::exit(code);
}
