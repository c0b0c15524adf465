"""The rest backend's own JWTs: signed with slurmrestd's HS256 key, the claims Slurm reads, the TokenProvider contract."""
from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from gateway.slurm.backend import SchedulerError
from gateway.slurm.factory import make_scheduler, make_token_provider
from gateway.slurm.tokens import JwtTokenProvider, TokenProvider, mint_jwt

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt_hs256.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    return path


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_mint_jwt_has_the_claims_slurm_reads() -> None:
    token = mint_jwt(KEY, "alice", 600, now=1_700_000_000)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, KEY, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sun": "alice", "iat": 1_700_000_000, "exp": 1_700_000_600}


def test_a_token_signed_with_another_key_does_not_verify() -> None:
    token = mint_jwt(KEY, "root", 600)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, b"another key, 32 bytes long......", algorithms=["HS256"])


def test_provider_reuses_its_token_until_it_nears_expiry(key_file: Path) -> None:
    mono, wall = Clock(), Clock(1_700_000_000)
    tokens = JwtTokenProvider("root", key_file, lifespan=100, clock=mono, wall_clock=wall)
    first = tokens.token()
    mono.now += 79
    wall.now += 79
    assert tokens.token() == first  # 21 s of 100 left: above refresh_fraction 0.2
    mono.now += 2
    wall.now += 2
    second = tokens.token()
    assert second != first
    assert jwt.decode(second, KEY, algorithms=["HS256"], options={"verify_exp": False})["iat"] == 1_700_000_081


def test_invalidate_rereads_the_key_file(key_file: Path) -> None:
    wall = Clock(1_700_000_000)
    tokens = JwtTokenProvider("root", key_file, lifespan=100, wall_clock=wall)
    tokens.token()
    key_file.write_bytes(b"a rotated key, 32 bytes long....")
    tokens.invalidate()
    jwt.decode(tokens.token(), b"a rotated key, 32 bytes long....", algorithms=["HS256"], options={"verify_exp": False})


def test_for_user_signs_for_that_user_with_the_same_key_and_lifespan(key_file: Path) -> None:
    tokens = JwtTokenProvider("root", key_file, lifespan=300)
    bob = tokens.for_user("bob")
    assert isinstance(bob, JwtTokenProvider) and bob.lifespan == 300 and bob.key_file == key_file
    claims = jwt.decode(bob.token(), KEY, algorithms=["HS256"])
    assert claims["sun"] == "bob" and claims["exp"] - claims["iat"] == 300


def test_an_unreadable_key_is_a_scheduler_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(SchedulerError, match="rest_jwt_key_file=.*nope.key"):
        JwtTokenProvider("root", missing).token()
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    with pytest.raises(SchedulerError, match="empty"):
        JwtTokenProvider("root", empty).token()


def test_the_key_never_appears_in_an_error(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"")
    with pytest.raises(SchedulerError) as caught:
        JwtTokenProvider("root", path).token()
    assert KEY.decode() not in str(caught.value)


def test_factory_chooses_the_token_source_from_config(key_file: Path) -> None:
    signed = make_token_provider({"SLURM_REST_JWT_KEY_FILE": str(key_file), "SLURM_REST_USER": "slurm",
                                  "SLURM_REST_TOKEN_LIFESPAN": 120})
    assert isinstance(signed, JwtTokenProvider) and signed.user == "slurm" and signed.lifespan == 120
    plain = make_token_provider({})
    assert type(plain) is TokenProvider and plain.user == "root"


def test_rest_backend_sends_the_signed_token(key_file: Path) -> None:
    seen: list[dict[str, str]] = []

    class Response:
        status_code = 200
        text = '{"pings": [{"hostname": "h", "ping": "UP"}], "errors": []}'
        content = text.encode()

        def json(self) -> dict[str, object]:
            return {"pings": [{"hostname": "h", "ping": "UP", "status": 0}], "errors": []}

    class Session:
        def request(self, method: str, url: str, headers: dict[str, str], **kwargs: object) -> Response:
            seen.append(headers)
            return Response()

    backend = make_scheduler({"SLURM_BACKEND": "rest", "SLURM_REST_JWT_KEY_FILE": str(key_file)}, session=Session())
    assert isinstance(backend.tokens, JwtTokenProvider)
    backend.ping()
    assert seen and seen[0]["X-SLURM-USER-NAME"] == "root"
    assert jwt.decode(seen[0]["X-SLURM-USER-TOKEN"], KEY, algorithms=["HS256"])["sun"] == "root"
