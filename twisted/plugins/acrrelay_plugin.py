"""twistd/twist plugin for acrrelay.

It imports nothing of ours: Twisted imports every plugin module, even for unrelated commands.
"""

from twisted.application.service import ServiceMaker

acrrelay = ServiceMaker(
    "acrrelay",
    "acrrelay.tap",
    "SNI relay for Alibaba Cloud Container Registry (registry, token service, OSS)",
    "acrrelay",
)
