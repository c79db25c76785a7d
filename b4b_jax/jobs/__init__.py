"""One module per `config.job`; each exposes `run(config, workdir)`."""
