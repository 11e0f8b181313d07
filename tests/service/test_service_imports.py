import subprocess
import sys


def test_service_never_imports_torch() -> None:
    code = (
        "import sys, service.cli, service.api.app, service.dicom.server, service.runtime, service.sweeper\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'lvpnet.codec', 'lvpnet.zoo'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
