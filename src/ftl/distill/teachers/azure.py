"""Azure OpenAI: a key from AZURE_OPENAI_API_KEY, or Entra ID through DefaultAzureCredential."""

from __future__ import annotations

import os

from ftl.distill.teachers.base import register
from ftl.distill.teachers.openai_compat import OpenAICompatibleTeacher, api_key
from ftl.errors import ConfigError

SCOPE = "https://cognitiveservices.azure.com/.default"


class AzureTeacher(OpenAICompatibleTeacher):
    name = "azure"


@register("azure")
def create_azure(config) -> AzureTeacher:
    import openai

    endpoint = config.endpoint or config.base_url or os.environ.get("AZURE_OPENAI_ENDPOINT")
    if not endpoint:
        raise ConfigError("the azure teacher needs an endpoint", "--endpoint / AZURE_OPENAI_ENDPOINT",
                          "e.g. --endpoint https://<resource>.openai.azure.com")
    if not config.model:
        raise ConfigError("the azure teacher needs a deployment name", "--model", "pass --model <deployment>")
    key = api_key(config, "AZURE_OPENAI_API_KEY")
    auth = {"api_key": key} if key else {"azure_ad_token_provider": _entra_token_provider()}
    client = openai.AsyncAzureOpenAI(azure_endpoint=endpoint, api_version=config.api_version, max_retries=0,
                                     timeout=config.timeout, **auth)
    return AzureTeacher(client, config.model)


def _entra_token_provider():
    try:
        from azure.identity import DefaultAzureCredential, get_bearer_token_provider
    except ImportError:
        raise ConfigError("no AZURE_OPENAI_API_KEY, and azure-identity is not installed for Entra ID",
                          "--teacher azure", "export AZURE_OPENAI_API_KEY, or pip install azure-identity") from None
    from azure.core.exceptions import ClientAuthenticationError

    inner = get_bearer_token_provider(DefaultAzureCredential(), SCOPE)

    def provider() -> str:
        try:
            return inner()
        except ClientAuthenticationError:
            raise ConfigError("no AZURE_OPENAI_API_KEY, and Entra ID sign-in found no credential "
                              "(DefaultAzureCredential)", "--teacher azure",
                              "run `az login`, set AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET (or a managed "
                              "identity), or export AZURE_OPENAI_API_KEY") from None

    return provider
