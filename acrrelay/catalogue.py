"""The host names an ACR image pull touches, per region.

A pull talks to three services, and every one must go through the relay:

- the **registry** (``registry[-vpc].REGION.aliyuncs.com``, Enterprise
  ``INSTANCE-registry[-vpc].REGION.cr.aliyuncs.com``, new Personal
  ``crpi-ID[-vpc].REGION.personal.cr.aliyuncs.com``);
- its **token service**, the Bearer realm (``dockerauth[-vpc|-ee|-ee-vpc].REGION.aliyuncs.com``;
  China (Zhangjiakou) also uses ``dockerauth-cn-zhangjiakou.aliyuncs.com``);
- **OSS**, where blob requests are redirected (``oss-REGION[-internal].aliyuncs.com`` and
  ``BUCKET.oss-REGION[-internal].aliyuncs.com``).

Sources and evidence labels are in ``shared/reference/acr-domains.md``: "V" is
stated by Alibaba's documentation, "O" is observed in real use.

This module is pure data and functions: no reactor, no sockets.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Final, Literal

import attrs

__all__ = ["NETWORKS", "REGIONS", "CatalogueEntry", "Network", "UnknownRegion", "acr_entries"]

Network = Literal["public", "vpc"]
NETWORKS: Final[tuple[Network, ...]] = ("public", "vpc")

#: Region id -> display name. ACR lists these, or they carry observed ACR hosts.
REGIONS: Final[dict[str, str]] = {
    "cn-qingdao": "China (Qingdao)",
    "cn-beijing": "China (Beijing)",
    "cn-zhangjiakou": "China (Zhangjiakou)",
    "cn-huhehaote": "China (Hohhot)",
    "cn-wulanchabu": "China (Ulanqab)",
    "cn-hangzhou": "China (Hangzhou)",
    "cn-shanghai": "China (Shanghai)",
    "cn-shenzhen": "China (Shenzhen)",
    "cn-heyuan": "China (Heyuan)",
    "cn-guangzhou": "China (Guangzhou)",
    "cn-chengdu": "China (Chengdu)",
    "cn-hongkong": "China (Hong Kong)",
    "cn-nanjing": "China (Nanjing - Local Region)",
    "cn-fuzhou": "China (Fuzhou - Local Region)",
    "cn-wuhan-lr": "China (Wuhan - Local Region)",
    "ap-southeast-1": "Singapore",
    "ap-southeast-2": "Australia (Sydney)",
    "ap-southeast-3": "Malaysia (Kuala Lumpur)",
    "ap-southeast-5": "Indonesia (Jakarta)",
    "ap-southeast-6": "Philippines (Manila)",
    "ap-southeast-7": "Thailand (Bangkok)",
    "ap-northeast-1": "Japan (Tokyo)",
    "ap-northeast-2": "South Korea (Seoul)",
    "ap-south-1": "India (Mumbai)",
    "us-west-1": "US (Silicon Valley)",
    "us-east-1": "US (Virginia)",
    "eu-central-1": "Germany (Frankfurt)",
    "eu-west-1": "UK (London)",
    "me-east-1": "UAE (Dubai)",
    "me-central-1": "Saudi Arabia (Riyadh)",
    "cn-shanghai-finance-1": "China East 2 Finance",
    "cn-shenzhen-finance-1": "China South 1 Finance",
    "cn-hangzhou-finance": "China East 1 Finance",
    "cn-beijing-finance-1": "China North 2 Finance",
}


class UnknownRegion(ValueError):
    """A region id that is not in the catalogue."""


@attrs.frozen
class CatalogueEntry:
    """One name pattern of a region, the service behind it, and how sure we are of it."""

    pattern: str
    service: Literal["registry", "auth", "oss"]
    network: Network
    evidence: Literal["V", "O"]
    note: str = ""


def acr_entries(region: str, networks: Iterable[Network] = NETWORKS) -> tuple[CatalogueEntry, ...]:
    """Every name an image pull in ``region`` may touch, on the given networks."""
    if region not in REGIONS:
        close = difflib.get_close_matches(region, REGIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UnknownRegion(f"unknown ACR region {region!r}{hint}")
    wanted = set(networks)
    r = region
    entries = [
        CatalogueEntry(f"registry.{r}.aliyuncs.com", "registry", "public", "V", "Personal/default"),
        CatalogueEntry(
            f"registry-vpc.{r}.aliyuncs.com", "registry", "vpc", "V", "Personal/default"
        ),
        CatalogueEntry(f"*-registry.{r}.cr.aliyuncs.com", "registry", "public", "V", "Enterprise"),
        CatalogueEntry(f"*-registry-vpc.{r}.cr.aliyuncs.com", "registry", "vpc", "V", "Enterprise"),
        CatalogueEntry(
            f"crpi-*.{r}.personal.cr.aliyuncs.com", "registry", "public", "V", "new Personal"
        ),
        CatalogueEntry(
            f"crpi-*-vpc.{r}.personal.cr.aliyuncs.com", "registry", "vpc", "V", "new Personal"
        ),
        CatalogueEntry(f"dockerauth.{r}.aliyuncs.com", "auth", "public", "V"),
        CatalogueEntry(f"dockerauth-vpc.{r}.aliyuncs.com", "auth", "vpc", "V"),
        CatalogueEntry(f"dockerauth-ee.{r}.aliyuncs.com", "auth", "public", "V", "Enterprise"),
        CatalogueEntry(f"dockerauth-ee-vpc.{r}.aliyuncs.com", "auth", "vpc", "V", "Enterprise"),
        CatalogueEntry(f"oss-{r}.aliyuncs.com", "oss", "public", "V"),
        CatalogueEntry(f"*.oss-{r}.aliyuncs.com", "oss", "public", "V", "buckets"),
        CatalogueEntry(f"oss-{r}-internal.aliyuncs.com", "oss", "vpc", "V"),
        CatalogueEntry(f"*.oss-{r}-internal.aliyuncs.com", "oss", "vpc", "V", "buckets"),
    ]
    if region == "cn-zhangjiakou":
        entries.insert(
            6,
            CatalogueEntry(
                "dockerauth-cn-zhangjiakou.aliyuncs.com", "auth", "public", "V", "Zhangjiakou"
            ),
        )
    return tuple(e for e in entries if e.network in wanted)
