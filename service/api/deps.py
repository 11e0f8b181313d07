"""FastAPI dependencies (Annotated): runtime, session, and who is asking."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.audit import Actor
from service.runtime import Runtime
from service.security import SESSION_COOKIE, Principal, Role, authenticate_key, verify_session

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def get_session(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Iterator[Session]:
    with runtime.session_factory() as session:
        yield session


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionDep = Annotated[Session, Depends(get_session)]


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": 'Bearer realm="lvpnet-archive"'})


# For the OpenAPI schema only (securitySchemes): the header and the cookie are read below
API_KEY = HTTPBearer(auto_error=False, scheme_name="apiKey", description="An API key: `Authorization: Bearer lvpa_...`")
SESSION = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    scheme_name="dashboardSession",
    description="The dashboard session (admin); requests that change state also need `X-Requested-With`",
)


def get_principal(
    request: Request,
    runtime: RuntimeDep,
    _key: Annotated[HTTPAuthorizationCredentials | None, Security(API_KEY)] = None,
    _session: Annotated[str | None, Security(SESSION)] = None,
) -> Principal:
    """Bearer API key, or the dashboard's session cookie.  401 when neither is valid."""
    if not runtime.settings.require_auth:
        principal = Principal("anonymous", Role.ADMIN, "anonymous")
    else:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if header:
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthorized("use Authorization: Bearer <API key>")
            with runtime.session_factory() as session:
                found = authenticate_key(session, token.strip())
            if found is None:
                raise _unauthorized("unknown or revoked API key")
            principal = found
        else:
            cookie = request.cookies.get(SESSION_COOKIE)
            found = verify_session(cookie, runtime.session_secret) if cookie else None
            if found is None:
                raise _unauthorized("authentication required")
            # A cookie rides along on cross-site requests; a custom header cannot be added by a form
            if request.method in UNSAFE_METHODS and request.headers.get("x-requested-with") != "lvpnet-archive":
                raise HTTPException(403, "session requests that change state need X-Requested-With: lvpnet-archive")
            principal = found
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(*roles: Role) -> Callable[[Principal], Principal]:
    """A dependency admitting the given roles (admin always); 403 for other authenticated callers."""

    def dependency(principal: PrincipalDep) -> Principal:
        if not principal.may(*roles):
            raise HTTPException(403, f"the {principal.role} role may not do this")
        return principal

    return dependency


def actor_of(request: Request) -> Actor:
    principal: Principal | None = getattr(request.state, "principal", None)
    remote = request.client.host if request.client else None
    if principal is None:
        return Actor("unknown", "anonymous", remote)
    return Actor(principal.name, principal.kind, remote)
