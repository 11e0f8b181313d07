"""Build and run the SCP.  Several processes may share the port (SO_REUSEPORT): one Python
process is held to one core, and receiving at line rate needs more than one."""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
from functools import partial
from typing import Any, cast

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from service.audit import Auditor
from service.config import Settings
from service.dicom.commitment import ActivityTracker, CommitmentReporter, ExpectedReportResponses
from service.dicom.find import handle_find
from service.dicom.handlers import (
    guard_data_set_size,
    handle_commitment_action,
    handle_echo,
    handle_requested,
    handle_store,
)
from service.dicom.retrieve import handle_get, handle_move
from service.ingest import Ingestor
from service.logs import fields
from service.retrieve import Retriever
from service.security import AllowList

LOGGER = logging.getLogger(__name__)
MAX_PDU_BYTES = 1 << 20


def configure_pynetdicom(settings: Settings) -> None:
    # Large objects go to disk as they arrive, not into memory.  The temporary file lands on the
    # data disk so that staging it is a rename, not a copy.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # Any SOP class, private ones included, is a storage class to us.
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # Don't log identifiers (pynetdicom logs request datasets at debug level)
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    association_log = logging.getLogger("pynetdicom.association")
    if not any(isinstance(f, ExpectedReportResponses) for f in association_log.filters):
        association_log.addFilter(ExpectedReportResponses())
    settings.incoming_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(settings.incoming_dir.resolve())


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.maximum_associations = 64
    ae.network_timeout = 120
    ae.dimse_timeout = 120
    ae.acse_timeout = 60
    # Non-storage classes are negotiated against these lists, in this order of preference
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    ae.add_supported_context(Verification, syntaxes)
    ae.add_supported_context(StorageCommitmentPushModel, syntaxes)
    for model in (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_supported_context(model, syntaxes)
    return ae


class ReusePortServer(ThreadedAssociationServer):
    """Threaded association server (one thread per association) whose listening socket may be
    shared by several SCP processes, and whose accepted sockets have TCP_NODELAY set.  Stopping it
    stops the Storage Commitment reporter that runs beside it."""

    reporter: CommitmentReporter | None = None

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.ae.network_timeout is not None:
            self.socket.settimeout(self.ae.network_timeout)
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def shutdown(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()
        super().shutdown()


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """DICOM TLS (PS3.15 B.1, TLS 1.2+): the SCP's certificate; with a CA, mutual TLS."""
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.dicom_tls_cert), str(settings.dicom_tls_key))
    if settings.dicom_tls_ca is not None:
        context.load_verify_locations(str(settings.dicom_tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def start_scp(
    settings: Settings, ingestor: Ingestor, retriever: Retriever, *, block: bool = False
) -> AssociationServer | None:
    configure_pynetdicom(settings)
    ae = build_ae(settings)
    store_allowed = AllowList.parse(settings.dicom_allowed_aes)
    qr_allowed = AllowList.parse(settings.dicom_qr_allowed_aes)
    auditor = Auditor(ingestor.session_factory)
    tracker = ActivityTracker()
    reporter = CommitmentReporter(settings, ingestor.session_factory, ingestor.store, tracker)
    handlers = [
        (
            evt.EVT_REQUESTED,
            partial(handle_requested, store_allowed=store_allowed, qr_allowed=qr_allowed, auditor=auditor),
        ),
        (evt.EVT_PDU_RECV, partial(guard_data_set_size, limit=settings.max_instance_bytes)),
        (evt.EVT_PDU_RECV, tracker.on_pdu_received),
        (evt.EVT_DIMSE_RECV, tracker.on_dimse_received),
        (evt.EVT_DIMSE_SENT, tracker.on_dimse_sent),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, partial(handle_store, ingestor=ingestor, store_allowed=store_allowed)),
        (evt.EVT_C_FIND, partial(handle_find, session_factory=ingestor.session_factory)),
        (
            evt.EVT_C_MOVE,
            partial(handle_move, retriever=retriever, session_factory=ingestor.session_factory, peers=settings.peers()),
        ),
        (evt.EVT_C_GET, partial(handle_get, retriever=retriever, session_factory=ingestor.session_factory)),
        (evt.EVT_N_ACTION, partial(handle_commitment_action, reporter=reporter)),
    ]
    address = (settings.host, settings.dicom_port)
    server = cast(
        ReusePortServer,
        ae.make_server(address, evt_handlers=handlers, server_class=ReusePortServer, ssl_context=tls_context(settings)),
    )
    server.reporter = reporter
    reporter.start()
    LOGGER.info("DICOM SCP listening", extra=fields(host=settings.host, port=server.server_address[1]))
    if block:
        try:
            server.serve_forever()
        finally:
            server.shutdown()
        return None
    import threading

    thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
    thread.start()
    ae._servers.append(server)  # so that ae.shutdown() stops it
    return server
