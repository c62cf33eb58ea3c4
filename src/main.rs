use clap::Parser;

fn main() {
    // Serve a render request when started as a render child; else render in children.
    kiln::recipe::sandbox::serve_or_enable();
    let cli = kiln::cli::Cli::parse();
    kiln::cli::init_logging(cli.verbose, cli.quiet);
    let code = match kiln::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            let broken_pipe = err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
            if broken_pipe {
                // The reader went away (`kiln render … | head`): not an error worth a message.
                0
            } else {
                eprintln!("error: {err:#}");
                1
            }
        }
    };
    std::process::exit(code);
}
