"""The one typed settings model: embedded defaults < TOML file (``--config``) < environment.

Environment variables are ``NEUROSCRIBE_<SECTION>__<KEY>``, e.g. ``NEUROSCRIBE_DICOM__PORT=104``.
Every section forbids unknown keys, so a typo fails at start-up instead of being ignored.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from neuroscribe.errors import ConfigError

ENV_PREFIX = "NEUROSCRIBE_"
ENV_NESTED_DELIMITER = "__"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ip_address(value: str) -> str:
    ipaddress.ip_address(value)  # raises ValueError naming the bad value
    return value


def _check_networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for net in value:
        ipaddress.ip_network(net, strict=False)  # raises ValueError naming the bad value
    return value


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, not all spaces, no '\\'")
    return value.strip()


class TlsSettings(_Section):
    """TLS for one listener or one outgoing connection (PEM files). Used by ``neuroscribe.tls``.

    A listener needs ``cert_file`` and ``key_file``; with ``require_peer_cert`` it also needs
    ``ca_file`` and refuses peers without a certificate that chains to it (mutual authentication).
    A client verifies the server against ``ca_file`` (the system store when empty) and its host
    name (IP addresses too), and presents ``cert_file``/``key_file`` when set.
    """

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_peer_cert: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ValueError(f"{missing} is not set: cert_file and key_file go together")
        if self.require_peer_cert and self.ca_file is None:
            raise ValueError("require_peer_cert needs ca_file (the CA that signs peer certificates)")
        return self


def _check_listener_tls(value: TlsSettings) -> TlsSettings:
    if value.enabled and value.cert_file is None:
        raise ValueError("TLS on a listener needs cert_file and key_file")
    return value


def _check_client_tls(value: TlsSettings) -> TlsSettings:
    if value.require_peer_cert:
        raise ValueError("require_peer_cert is for listeners; a client always verifies the server")
    return value


class DicomSettings(_Section):
    """The Storage SCP: who may send, on which address, with which limits."""

    ae_title: str = "NEUROSCRIBE"
    bind: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    #: Refuse associations whose called AE title is not ours.
    require_called_ae: bool = True
    #: Calling AE titles allowed to connect; empty accepts any (a warning is logged at start).
    allowed_calling_aes: tuple[str, ...] = ()
    #: Source addresses or networks (CIDR) allowed to connect; empty accepts any (with a warning).
    allowed_networks: tuple[str, ...] = ()
    #: Store instances of storage SOP classes other than CT and Enhanced CT (they are kept and then
    #: rejected from reporting with a reason); false refuses their presentation contexts.
    accept_other_storage: bool = True
    max_associations: int = Field(16, ge=1, le=1000)
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    #: Largest P-DATA PDU we accept; 0 means unlimited, the fastest for large CT slices.
    max_pdu_size: int = Field(0, ge=0)
    #: DICOM TLS on the listener (``[dicom.tls]``): cert_file and key_file, and for mutual
    #: authentication require_peer_cert with ca_file. A TLS port speaks TLS only.
    tls: TlsSettings = TlsSettings()

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _allowed_aes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)

    _allowed_networks = field_validator("allowed_networks")(_check_networks)

    _bind = field_validator("bind")(_check_ip_address)

    @field_validator("tls")
    @classmethod
    def _tls(cls, value: TlsSettings) -> TlsSettings:
        return _check_listener_tls(value)


class StorageSettings(_Section):
    """Where the spool, the state database and the logs live, and how full the disk may get."""

    root: Path = Path("./var")
    #: C-STORE answers 0xA700 (out of resources) when free space under ``root`` is below this.
    min_free_bytes: int = Field(2 * 1024**3, ge=0)
    #: SQLAlchemy URL of the state database; empty means SQLite at ``<root>/state.sqlite3``.
    database_url: str = ""

    @property
    def spool_dir(self) -> Path:
        """Received instances, one folder per series (``<root>/spool``)."""
        return self.root / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Partial instances while they stream in (``<root>/incoming``), same filesystem."""
        return self.root / "incoming"

    @property
    def log_dir(self) -> Path:
        """JSON-lines logs (``<root>/logs``)."""
        return self.root / "logs"

    @property
    def models_dir(self) -> Path:
        """The default model registry folder (``<root>/models``)."""
        return self.root / "models"

    @property
    def resolved_database_url(self) -> str:
        """The database URL in use."""
        return self.database_url or f"sqlite:///{(self.root / 'state.sqlite3').resolve()}"


class SeriesSettings(_Section):
    """When a series counts as complete."""

    #: A series is COMPLETE after this many seconds without a new instance.
    quiet_seconds: float = Field(30.0, gt=0)
    #: A series still receiving this long after its first instance is completed anyway.
    force_complete_seconds: float = Field(3600.0, gt=0)
    #: How often the assembler looks for quiet series.
    poll_seconds: float = Field(1.0, gt=0)

    @field_validator("force_complete_seconds")
    @classmethod
    def _ceiling_above_quiet(cls, value: float, info: ValidationInfo) -> float:
        quiet = info.data.get("quiet_seconds")
        if quiet is not None and value <= quiet:
            raise ValueError(f"must exceed quiet_seconds ({quiet})")
        return value


class SelectionSettings(_Section):
    """Which completed series are head CTs worth a report (in the spirit of MONAI's selector)."""

    modalities: tuple[str, ...] = ("CT",)
    #: Every one of these values must be in ImageType (case-insensitive).
    image_type_required: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    #: None of these may be in ImageType (localizers, derived reformats).
    image_type_excluded: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY")
    slice_thickness_min_mm: float = Field(0.5, ge=0)
    slice_thickness_max_mm: float = Field(6.0, gt=0)
    min_slices: int = Field(16, ge=2)
    #: Searched (case-insensitive) in BodyPartExamined, then Series/Study description, ProtocolName.
    head_pattern: str = r"head|brain|skull|cran|cerebr|neuro|kopf|schaedel|sch\u00e4del|t\u00eate|cabeza"
    #: Of several matching series in one study, report on the one with the most slices.
    prefer_largest: bool = True

    @field_validator("head_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @field_validator("slice_thickness_max_mm")
    @classmethod
    def _range(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("slice_thickness_min_mm")
        if low is not None and value < low:
            raise ValueError(f"is below slice_thickness_min_mm ({low})")
        return value


class ModelsSettings(_Section):
    """The model registry: where bundles live and what a new one must score to replace the current."""

    #: Registry folder (bundles and ``registry.json``); empty means ``<storage.root>/models``.
    dir: Path | None = None
    #: A candidate's strict FORTE mean F1 on the held-out set must exceed the current model's by this.
    promotion_margin: float = Field(0.01, ge=0.0, le=1.0)
    #: A bundle folder to serve instead of the registry's current model. Empty: the registry's
    #: current model, or else the demo bundle of the source tree (synthetic phantoms only).
    bundle: Path | None = None


_DESTINATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
#: HL7 table 0004 (patient class); mirrors ``reporting.hl7.PATIENT_CLASSES`` (config imports no stage).
_PATIENT_CLASSES = frozenset("EIOPRBCNU")
#: Charsets the MLLP client encodes with (``reporting.hl7.OruOptions.charset``).
Charset = Literal["utf-8", "iso-8859-1", "ascii"]


def _check_destination_name(value: str) -> str:
    if not _DESTINATION_NAME.match(value):
        raise ValueError("a destination name is 1 to 32 characters: letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    return value


class PacsDestination(_Section):
    """One ``[[pacs]]`` table: a PACS that receives every report's SR by C-STORE."""

    #: Names the destination in the outbox, ``neuroscribe outbox list`` and logs; unique among PACS.
    name: str
    #: The PACS's (called) AE title.
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    #: Our AE title towards this PACS; empty means ``dicom.ae_title``.
    calling_ae_title: str = ""
    #: Seconds for each step of an attempt (connect, association, each response).
    timeout_seconds: float = Field(30.0, gt=0)
    #: DICOM TLS towards this PACS (``[pacs.tls]``): ca_file, and cert_file/key_file if it wants ours.
    tls: TlsSettings = TlsSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_destination_name(value)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("calling_ae_title")
    @classmethod
    def _calling_ae_title(cls, value: str) -> str:
        return _check_ae_title(value) if value else value

    @field_validator("tls")
    @classmethod
    def _tls(cls, value: TlsSettings) -> TlsSettings:
        return _check_client_tls(value)


class RisDestination(_Section):
    """One ``[[ris]]`` table: a RIS that receives every report's ORU^R01 over MLLP."""

    #: Names the destination in the outbox, ``neuroscribe outbox list`` and logs; unique among RIS.
    name: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    #: Seconds to connect, and from the end of sending to the whole ACK.
    timeout_seconds: float = Field(30.0, gt=0)
    #: Wire charset; empty means ``hl7.charset``. Must equal it when set: MSH-18 declares that one.
    encoding: Charset | Literal[""] = ""
    #: MLLP over TLS towards this RIS (``[ris.tls]``): ca_file, and cert_file/key_file if it wants ours.
    tls: TlsSettings = TlsSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_destination_name(value)

    @field_validator("tls")
    @classmethod
    def _tls(cls, value: TlsSettings) -> TlsSettings:
        return _check_client_tls(value)


class CodeSetting(_Section):
    """A coded value (CE/CWE) for the ORU: ``{ code = "19005-8", text = "...", system = "LN" }``."""

    code: str = Field(min_length=1)
    text: str = ""
    system: str = "L"


class Hl7Settings(_Section):
    """What goes where in the ORU^R01: the fields of ``reporting.hl7.OruOptions``, from the RIS's spec."""

    sending_application: str = "NEUROSCRIBE"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    processing_id: Literal["P", "T", "D"] = "P"
    patient_id_issuer: str = ""
    patient_id_type: str = "MR"
    accession_fields: tuple[Literal["OBR-2", "OBR-3", "OBR-18", "OBR-19"], ...] = Field(
        ("OBR-3", "OBR-18"), min_length=1
    )
    procedure_source: Literal["procedure_code", "study_description", "default"] = "procedure_code"
    default_procedure: CodeSetting = CodeSetting(code="CTHEAD", text="CT HEAD", system="L")
    findings_code: CodeSetting = CodeSetting(code="FINDINGS", text="Findings", system="L")
    impression_code: CodeSetting = CodeSetting(code="IMPRESSION", text="Impression", system="L")
    disclaimer_code: CodeSetting = CodeSetting(code="DISCLAIMER", text="AI draft disclaimer", system="L")
    disclaimer_segment: Literal["OBX", "NTE"] = "OBX"
    #: PV1-2; empty leaves PV1 out.
    patient_class: str = "U"
    diagnostic_section: str = "CT"
    #: When set, a last OBX carries the StudyInstanceUID under this code.
    study_uid_code: CodeSetting | None = None
    charset: Charset = "utf-8"

    @field_validator("patient_class")
    @classmethod
    def _patient_class(cls, value: str) -> str:
        if value and value not in _PATIENT_CLASSES:
            raise ValueError(f"must be one of {''.join(sorted(_PATIENT_CLASSES))} (HL7 table 0004) or empty")
        return value

    @field_validator("accession_fields")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("lists a field twice")
        return value

    def oru_options(self) -> dict[str, Any]:
        """Keyword arguments of ``reporting.hl7.OruOptions`` (``patient_class`` empty becomes None)."""
        options = self.model_dump()
        options["patient_class"] = self.patient_class or None
        return options


class OutboxSettings(_Section):
    """The durable outbox: how often undelivered reports are retried, and when they become dead letters."""

    #: Delay after the first failed attempt.
    backoff_base_seconds: float = Field(30.0, gt=0)
    #: Each further failure multiplies the delay by this.
    backoff_factor: float = Field(2.0, ge=1.0, le=10.0)
    #: The delay never exceeds this, jitter included.
    backoff_ceiling_seconds: float = Field(4 * 3600.0, gt=0)
    #: Each delay is multiplied by a random factor in [1 - jitter, 1 + jitter] (then capped).
    jitter: float = Field(0.1, ge=0.0, lt=1.0)
    #: An item still failing this long after it was queued (or retried by hand) becomes a dead letter.
    dead_letter_after_seconds: float = Field(72 * 3600.0, gt=0)
    #: Failed attempts before an item becomes a dead letter regardless of age; 0: age alone decides.
    max_attempts: int = Field(0, ge=0)
    #: How often the delivery thread looks for due items.
    poll_seconds: float = Field(5.0, gt=0)

    @field_validator("backoff_ceiling_seconds")
    @classmethod
    def _ceiling_above_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base_seconds")
        if base is not None and value < base:
            raise ValueError(f"is below backoff_base_seconds ({base})")
        return value


class HttpSettings(_Section):
    """The health and metrics endpoint: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus)."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    #: 0 picks a free port (logged at start; tests use it).
    port: int = Field(9466, ge=0, le=65535)

    _bind = field_validator("bind")(_check_ip_address)


class InferenceSettings(_Section):
    """The drafting worker: a separate process that loads the model and turns selected series into reports."""

    enabled: bool = True
    #: ``auto`` uses CUDA when ONNX Runtime has it, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: ONNX Runtime intra-op threads; 0 lets it choose.
    threads: int = Field(0, ge=0, le=256)
    #: How often the worker looks for queued jobs (it is also woken when one is queued).
    poll_seconds: float = Field(1.0, gt=0)
    #: A job whose worker died is retried this many times, then marked failed with its reason.
    max_attempts: int = Field(3, ge=1, le=100)


#: HL7 table 0123 (result status) codes an ``accepted_statuses`` entry may use.
RESULT_STATUSES = frozenset("OISAPCRFXYZ")


class LearningSettings(_Section):
    """Learning from the site: the MLLP listener for the RIS's final reports and the training store.

    Each final report (ORU^R01, OBR-25 in ``accepted_statuses``) is paired with the series we
    reported on by its accession number; the pair is kept de-identified (PS3.15 Basic Profile) under
    ``site_data_dir`` with ``manifest.jsonl`` for ``neuroscribe train --data`` (docs/learning.md).
    """

    enabled: bool = False
    bind: str = "127.0.0.1"
    #: MLLP port for the RIS; 0 picks a free port (logged at start; tests use it).
    port: int = Field(2576, ge=0, le=65535)
    #: MLLP over TLS (``[learning.tls]``): cert_file and key_file, and for mutual authentication
    #: require_peer_cert with ca_file. A TLS port speaks TLS only.
    tls: TlsSettings = TlsSettings()
    #: Source addresses or networks (CIDR) allowed to connect; empty accepts any (with a warning).
    allowed_networks: tuple[str, ...] = ()
    #: Simultaneous connections; more are closed at once.
    max_connections: int = Field(8, ge=1, le=256)
    #: A connection idle (or mid-message) this long is closed.
    read_timeout_seconds: float = Field(60.0, gt=0)
    #: A message larger than this is not read: the connection is closed.
    max_message_bytes: int = Field(4 * 1024**2, ge=1024)
    #: OBR-25 values kept as final reports; any other is acknowledged (AA) and ignored.
    accepted_statuses: tuple[str, ...] = ("F", "C")
    #: The training store; empty means ``<storage.root>/site-data``.
    site_data_dir: Path | None = None
    #: A final report still without its series this long after it arrived is given up.
    pair_timeout_hours: float = Field(72.0, gt=0)
    #: How often unpaired final reports are tried again (the service's scheduler).
    pair_retry_seconds: float = Field(300.0, gt=0)
    #: The training store's size limit; the oldest pairs are deleted beyond it.
    quota_bytes: int = Field(50 * 1024**3, gt=0)
    #: The site secret keying patient pseudonyms and new UIDs (created, mode 0600, when missing).
    #: Keep it out of the training store: with it, pseudonyms can be re-identified. Empty means
    #: ``<storage.root>/secrets/deid.key``.
    secret_file: Path | None = None
    #: Pair only when the report's PID-3 is the series' PatientID (compared as keyed hashes).
    check_patient_id: bool = True

    _bind = field_validator("bind")(_check_ip_address)

    _allowed_networks = field_validator("allowed_networks")(_check_networks)

    @field_validator("tls")
    @classmethod
    def _tls(cls, value: TlsSettings) -> TlsSettings:
        return _check_listener_tls(value)

    @field_validator("accepted_statuses")
    @classmethod
    def _statuses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one OBR-25 result status (F is the final report)")
        for status in value:
            if status not in RESULT_STATUSES:
                raise ValueError(f"{status!r} is not an HL7 table 0123 result status "
                                 f"(one of {''.join(sorted(RESULT_STATUSES))})")
        return value


class RetentionSettings(_Section):
    """How long received series stay in the spool (the training store has ``learning.quota_bytes``)."""

    enabled: bool = True
    #: A series is deleted from the spool this long after its report job ended (delivered, dead
    #: or failed). Retention wins: a final report arriving later finds no series to pair with.
    purge_spool_after_hours: float = Field(72.0, ge=0)
    #: A series not selected for a report is deleted this long after the decision.
    purge_rejected_after_hours: float = Field(24.0, ge=0)
    #: How often the retention pass runs (the service's scheduler).
    poll_seconds: float = Field(3600.0, gt=0)


class RetrainingSettings(_Section):
    """Scheduled retraining on the site's paired studies (docs/retraining.md).

    When enabled, the service checks every ``check_every_hours`` whether at least ``min_new_pairs``
    studies with final reports (``<storage.root>/site-data/manifest.jsonl``) arrived since the last
    run; if so it trains a candidate in a subprocess under the limits below and offers it to the
    registry's promotion gate (``[models] promotion_margin``). ``neuroscribe retrain`` runs the
    same check by hand, enabled or not.
    """

    enabled: bool = False
    #: Paired studies the last run did not use that are needed to start a run.
    min_new_pairs: int = Field(50, ge=1)
    #: How often the service checks for new pairs (hours). A failed run is retried at this pace.
    check_every_hours: float = Field(6.0, gt=0, le=24 * 366)
    #: TOML file of training settings (docs/training.md). Empty: the demo model's
    #: ``models/demo/train.toml`` of a source checkout; a packaged install has none, so set it.
    train_config: Path | None = None
    #: A training or gate subprocess still running after this long is killed (its process group).
    timeout_hours: float = Field(12.0, gt=0)
    #: RLIMIT_DATA of the subprocesses (private writable memory: heap, arrays), bytes; 0: no limit.
    memory_limit_bytes: int = Field(32 * 1024**3, ge=0)
    #: RLIMIT_CPU of the subprocesses (CPU seconds, all threads together); 0: no limit.
    cpu_limit_seconds: int = Field(0, ge=0)
    #: Niceness added to the subprocesses, so the service keeps its share of the CPU.
    cpu_nice: int = Field(10, ge=0, le=19)
    #: Folder of the run folders; empty: ``<storage.root>/retraining/runs``.
    runs_dir: Path | None = None
    #: Run folders kept, newest first; older ones are deleted (the registry holds its own copies).
    keep_runs: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _train_config_exists(self) -> RetrainingSettings:
        if self.enabled and self.train_config is not None and not self.train_config.is_file():
            raise ValueError(f"train_config {str(self.train_config)!r}: no such file")
        return self


class LoggingSettings(_Section):
    """structlog output: JSON lines to stdout and to ``<storage.root>/logs``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: ``console`` renders for a terminal; files are always JSON lines.
    format: Literal["json", "console"] = "json"
    to_file: bool = True


class Settings(BaseSettings):
    """All of NeuroScribe's settings. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    series: SeriesSettings = SeriesSettings()
    selection: SelectionSettings = SelectionSettings()
    models: ModelsSettings = ModelsSettings()
    logging: LoggingSettings = LoggingSettings()
    http: HttpSettings = HttpSettings()
    inference: InferenceSettings = InferenceSettings()
    retraining: RetrainingSettings = RetrainingSettings()
    learning: LearningSettings = LearningSettings()
    retention: RetentionSettings = RetentionSettings()
    hl7: Hl7Settings = Hl7Settings()
    outbox: OutboxSettings = OutboxSettings()
    #: ``[[pacs]]`` tables: every report's SR goes to each.
    pacs: tuple[PacsDestination, ...] = ()
    #: ``[[ris]]`` tables: every report's ORU^R01 goes to each.
    ris: tuple[RisDestination, ...] = ()

    @field_validator("pacs", "ris")
    @classmethod
    def _unique_names(
        cls, value: tuple[PacsDestination | RisDestination, ...], info: ValidationInfo
    ) -> tuple[PacsDestination | RisDestination, ...]:
        seen: dict[str, int] = {}
        for index, destination in enumerate(value):
            if destination.name in seen:
                raise ValueError(f"{info.field_name}[{index}].name {destination.name!r} is already the name "
                                 f"of {info.field_name}[{seen[destination.name]}]; names must be unique")
            seen[destination.name] = index
        return value

    @field_validator("ris")
    @classmethod
    def _ris_encoding(
        cls, value: tuple[RisDestination, ...], info: ValidationInfo
    ) -> tuple[RisDestination, ...]:
        hl7 = info.data.get("hl7")
        for index, destination in enumerate(value):
            if hl7 is not None and destination.encoding and destination.encoding != hl7.charset:
                raise ValueError(f"ris[{index}].encoding {destination.encoding!r} differs from hl7.charset "
                                 f"({hl7.charset!r}), which MSH-18 declares; leave it empty or equal")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then environment, then the TOML file, then defaults."""
        # The TOML source reads ``model_config["toml_file"]``, set by load_settings; None reads nothing.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, failing with a :class:`ConfigError` that names key, value and reason.

    Parameters
    ----------
    config_file
        A TOML file with ``[dicom]``, ``[storage]``, ``[series]``, ``[selection]``, ``[models]``,
        ``[logging]``, ``[hl7]``, ``[outbox]`` and ``[[pacs]]``/``[[ris]]`` tables.
    overrides
        Section dicts that win over everything (tests use them).
    """
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise ConfigError(f"config file {str(config_file)!r}: no such file")
        try:
            with config_file.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(config_file)!r}: not valid TOML: {exc}") from exc
    from_file = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}}
    )
    try:
        return from_file(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    """One line per bad setting: ``dicom.port = 70000: Input should be less than or equal to...``.

    Keys inside ``[[pacs]]``/``[[ris]]`` read ``pacs[1].port``; their environment variable is the
    whole array (``NEUROSCRIBE_PACS``, as JSON).
    """
    lines = []
    for error in exc.errors():
        key = _dotted(error["loc"])
        value = error.get("input")
        shown = "(missing)" if error["type"] == "missing" else repr(value)
        if isinstance(value, dict):
            shown = "(section)"
        elif isinstance(value, list | tuple) and value and all(isinstance(v, dict | BaseModel)
                                                                for v in value):
            shown = f"({len(value)} table{'s' if len(value) > 1 else ''})"
        reason = error["msg"].removeprefix("Value error, ")
        env_loc = next((error["loc"][:i] for i, part in enumerate(error["loc"]) if isinstance(part, int)),
                       error["loc"])
        env = ENV_PREFIX + _dotted(env_loc).upper().replace(".", ENV_NESTED_DELIMITER)
        lines.append(f"{key} = {shown}: {reason} (file key {key!r} or environment {env})")
    origin = f" in {str(config_file)!r} or the environment" if config_file else ""
    return f"invalid configuration{origin}:\n  " + "\n  ".join(lines)


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("pacs", 1, "port")`` as ``pacs[1].port``; ``()`` as ``(settings)``."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "(settings)"
