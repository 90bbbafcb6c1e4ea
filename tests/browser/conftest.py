"""The project fixtures of the integration tests: a trained demo in a private project root."""

from tests.integration.conftest import demo_template, hydra_configs, project  # noqa: F401
