from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateCollectionRequest(_message.Message):
    __slots__ = ("collection_id", "dimension", "threshold", "require_purpose", "reference_mean")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_PURPOSE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MEAN_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    dimension: int
    threshold: float
    require_purpose: bool
    reference_mean: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, collection_id: _Optional[str] = ..., dimension: _Optional[int] = ..., threshold: _Optional[float] = ..., require_purpose: _Optional[bool] = ..., reference_mean: _Optional[_Iterable[float]] = ...) -> None: ...

class GetCollectionRequest(_message.Message):
    __slots__ = ("collection_id",)
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    def __init__(self, collection_id: _Optional[str] = ...) -> None: ...

class UpdateCollectionRequest(_message.Message):
    __slots__ = ("collection_id", "threshold", "require_purpose")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_PURPOSE_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    threshold: float
    require_purpose: bool
    def __init__(self, collection_id: _Optional[str] = ..., threshold: _Optional[float] = ..., require_purpose: _Optional[bool] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections", "next_page_token", "damaged")
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[Collection]
    next_page_token: str
    damaged: _containers.RepeatedCompositeFieldContainer[DamagedCollection]
    def __init__(self, collections: _Optional[_Iterable[_Union[Collection, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., damaged: _Optional[_Iterable[_Union[DamagedCollection, _Mapping]]] = ...) -> None: ...

class DamagedCollection(_message.Message):
    __slots__ = ("collection_id", "reason")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    reason: str
    def __init__(self, collection_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteCollectionRequest(_message.Message):
    __slots__ = ("collection_id",)
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    def __init__(self, collection_id: _Optional[str] = ...) -> None: ...

class DeleteCollectionResponse(_message.Message):
    __slots__ = ("templates_deleted",)
    TEMPLATES_DELETED_FIELD_NUMBER: _ClassVar[int]
    templates_deleted: int
    def __init__(self, templates_deleted: _Optional[int] = ...) -> None: ...

class Collection(_message.Message):
    __slots__ = ("collection_id", "dimension", "threshold", "key_version", "template_count", "min_key_version", "require_purpose")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_PURPOSE_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    template_count: int
    min_key_version: int
    require_purpose: bool
    def __init__(self, collection_id: _Optional[str] = ..., dimension: _Optional[int] = ..., threshold: _Optional[float] = ..., key_version: _Optional[int] = ..., template_count: _Optional[int] = ..., min_key_version: _Optional[int] = ..., require_purpose: _Optional[bool] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("collection_id", "subject_id", "embedding", "request_id", "allow_new_face")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NEW_FACE_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    subject_id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    request_id: str
    allow_new_face: bool
    def __init__(self, collection_id: _Optional[str] = ..., subject_id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., request_id: _Optional[str] = ..., allow_new_face: _Optional[bool] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("template_id", "key_version")
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    template_id: str
    key_version: int
    def __init__(self, template_id: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...

class MatchRequest(_message.Message):
    __slots__ = ("collection_id", "embedding", "subject_id", "top_k", "release_scores", "purpose")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SCORES_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    subject_id: str
    top_k: int
    release_scores: bool
    purpose: str
    def __init__(self, collection_id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., subject_id: _Optional[str] = ..., top_k: _Optional[int] = ..., release_scores: _Optional[bool] = ..., purpose: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("subject_id", "score")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    score: float
    def __init__(self, subject_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("matched", "candidates", "scores_released")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SCORES_RELEASED_FIELD_NUMBER: _ClassVar[int]
    matched: bool
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    scores_released: bool
    def __init__(self, matched: _Optional[bool] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., scores_released: _Optional[bool] = ...) -> None: ...

class DeleteSubjectRequest(_message.Message):
    __slots__ = ("collection_id", "subject_id")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    subject_id: str
    def __init__(self, collection_id: _Optional[str] = ..., subject_id: _Optional[str] = ...) -> None: ...

class DeleteSubjectResponse(_message.Message):
    __slots__ = ("deleted_templates",)
    DELETED_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    deleted_templates: int
    def __init__(self, deleted_templates: _Optional[int] = ...) -> None: ...

class ImportTemplatesRequest(_message.Message):
    __slots__ = ("collection_id", "items")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    items: _containers.RepeatedCompositeFieldContainer[ImportItem]
    def __init__(self, collection_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ImportItem, _Mapping]]] = ...) -> None: ...

class ImportItem(_message.Message):
    __slots__ = ("subject_id", "embedding", "request_id")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    request_id: str
    def __init__(self, subject_id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ImportTemplatesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImportResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ImportResult, _Mapping]]] = ...) -> None: ...

class ImportResult(_message.Message):
    __slots__ = ("index", "template_id", "key_version", "code", "message", "replayed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    index: int
    template_id: str
    key_version: int
    code: int
    message: str
    replayed: bool
    def __init__(self, index: _Optional[int] = ..., template_id: _Optional[str] = ..., key_version: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ListKeyVersionsRequest(_message.Message):
    __slots__ = ("collection_id",)
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    def __init__(self, collection_id: _Optional[str] = ...) -> None: ...

class KeyVersions(_message.Message):
    __slots__ = ("master_key_versions", "current_master_key_version", "collection_id", "key_version", "min_key_version", "key_versions", "job")
    MASTER_KEY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MASTER_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    master_key_versions: _containers.RepeatedScalarFieldContainer[int]
    current_master_key_version: int
    collection_id: str
    key_version: int
    min_key_version: int
    key_versions: _containers.RepeatedScalarFieldContainer[int]
    job: KeyJob
    def __init__(self, master_key_versions: _Optional[_Iterable[int]] = ..., current_master_key_version: _Optional[int] = ..., collection_id: _Optional[str] = ..., key_version: _Optional[int] = ..., min_key_version: _Optional[int] = ..., key_versions: _Optional[_Iterable[int]] = ..., job: _Optional[_Union[KeyJob, _Mapping]] = ...) -> None: ...

class RotateMasterKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewrapKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MasterKeyRotation(_message.Message):
    __slots__ = ("version", "rewrapped", "destroyed_versions")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    rewrapped: int
    destroyed_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., rewrapped: _Optional[int] = ..., destroyed_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class RotateCollectionKeyRequest(_message.Message):
    __slots__ = ("collection_id",)
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    def __init__(self, collection_id: _Optional[str] = ...) -> None: ...

class GetKeyJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class KeyJob(_message.Message):
    __slots__ = ("job_id", "collection_id", "from_version", "to_version", "state", "blocks_done", "blocks_total", "error")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[KeyJob.State]
        STATE_RUNNING: _ClassVar[KeyJob.State]
        STATE_DONE: _ClassVar[KeyJob.State]
        STATE_FAILED: _ClassVar[KeyJob.State]
    STATE_UNSPECIFIED: KeyJob.State
    STATE_RUNNING: KeyJob.State
    STATE_DONE: KeyJob.State
    STATE_FAILED: KeyJob.State
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    collection_id: str
    from_version: int
    to_version: int
    state: KeyJob.State
    blocks_done: int
    blocks_total: int
    error: str
    def __init__(self, job_id: _Optional[str] = ..., collection_id: _Optional[str] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., state: _Optional[_Union[KeyJob.State, str]] = ..., blocks_done: _Optional[int] = ..., blocks_total: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SetMinKeyVersionRequest(_message.Message):
    __slots__ = ("collection_id", "min_key_version")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    MIN_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    min_key_version: int
    def __init__(self, collection_id: _Optional[str] = ..., min_key_version: _Optional[int] = ...) -> None: ...

class UnlockSubjectRequest(_message.Message):
    __slots__ = ("collection_id", "subject_id")
    COLLECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    collection_id: str
    subject_id: str
    def __init__(self, collection_id: _Optional[str] = ..., subject_id: _Optional[str] = ...) -> None: ...

class UnlockSubjectResponse(_message.Message):
    __slots__ = ("unlocked_credentials",)
    UNLOCKED_CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    unlocked_credentials: int
    def __init__(self, unlocked_credentials: _Optional[int] = ...) -> None: ...
