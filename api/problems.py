"""RFC 9457 problem responses: the one place where domain errors meet HTTP statuses.

`title` and `detail` are in French by default (SecNumCloud 19.3) and in English when
`Accept-Language` prefers it. Details are fixed texts per code: they never echo input.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from api.responses import Json
from kms import errors as e

PROBLEM_TYPE_BASE = "https://kms.invalid/problems/"

# code -> (status, (fr title, fr detail), (en title, en detail))
_PROBLEMS: dict[str, tuple[int, tuple[str, str], tuple[str, str]]] = {
    "invalid_request": (400, ("Requête invalide", "La requête est mal formée ou incomplète."),
                        ("Invalid request", "The request is malformed or incomplete.")),
    "decryption_failed": (400, ("Échec du déchiffrement",
                                "Le texte chiffré ne peut pas être déchiffré avec cette clé "
                                "et ce contexte."),
                          ("Decryption failed",
                           "The ciphertext cannot be decrypted with this key and context.")),
    "key_version_unavailable": (400, ("Version de clé indisponible",
                                      "Cette version de la clé ne peut plus déchiffrer."),
                                ("Key version unavailable",
                                 "This key version may no longer decrypt.")),
    "incompatible_roles": (400, ("Rôles incompatibles",
                                 "Cette identité détient déjà un rôle incompatible avec celui-ci "
                                 "(séparation des tâches)."),
                           ("Incompatible roles",
                            "This identity already holds a role incompatible with this one "
                            "(separation of duties).")),
    "unauthenticated": (401, ("Authentification requise",
                              "Jeton d'accès absent, invalide ou révoqué."),
                        ("Authentication required",
                         "Bearer token missing, invalid or revoked.")),
    "login_failed": (401, ("Échec de la connexion",
                           "Identifiant, mot de passe ou code TOTP incorrect, ou compte "
                           "verrouillé."),
                     ("Login failed",
                      "Wrong username, password or TOTP code, or a locked account.")),
    "forbidden": (403, ("Accès refusé", "Votre rôle ne permet pas cette opération."),
                  ("Forbidden", "Your role does not allow this operation.")),
    "tenant_suspended": (403, ("Locataire suspendu", "Le locataire est suspendu."),
                         ("Tenant suspended", "The tenant is suspended.")),
    "key_disabled": (403, ("Clé désactivée", "La clé est désactivée."),
                     ("Key disabled", "The key is disabled.")),
    "not_found": (404, ("Introuvable", "L'objet demandé n'existe pas."),
                  ("Not found", "The requested object does not exist.")),
    "method_not_allowed": (405, ("Méthode non autorisée",
                                 "Cette méthode n'est pas acceptée sur cette ressource."),
                           ("Method not allowed",
                            "This method is not accepted on this resource.")),
    "already_exists": (409, ("Existe déjà", "Un objet de ce nom existe déjà."),
                       ("Already exists", "An object with this name already exists.")),
    "invalid_state": (409, ("État incompatible",
                            "L'opération ne s'applique pas à l'état actuel du locataire."),
                      ("Invalid state",
                       "The operation does not apply to the tenant's current state.")),
    "tenant_in_notice": (409, ("Locataire en préavis",
                               "Le locataire est en préavis de fin de contrat : aucune "
                               "création n'est possible, l'existant reste utilisable."),
                         ("Tenant under notice",
                          "The tenant is under end-of-contract notice: nothing new can be "
                          "created, existing objects keep working.")),
    "tenant_erased": (410, ("Locataire effacé", "Les clés du locataire ont été détruites."),
                      ("Tenant erased", "The tenant's keys have been destroyed.")),
    "payload_too_large": (413, ("Requête trop volumineuse",
                                "Le corps de la requête dépasse la taille autorisée."),
                          ("Payload too large", "The request body exceeds the allowed size.")),
    "unsupported_media_type": (415, ("Type de contenu non pris en charge",
                                     "Le corps doit être du JSON (application/json)."),
                               ("Unsupported media type",
                                "The body must be JSON (application/json).")),
    "key_integrity_error": (500, ("Erreur d'intégrité de clé",
                                  "Une clé stockée ne correspond pas à sa place ; "
                                  "l'opérateur est prévenu."),
                            ("Key integrity error",
                             "A stored key does not match its place; the operator is "
                             "alerted.")),
    "invalid_configuration": (500, ("Configuration invalide",
                                    "Le service est mal configuré."),
                              ("Invalid configuration", "The service is misconfigured.")),
    "internal_error": (500, ("Erreur interne", "Une erreur interne est survenue."),
                       ("Internal error", "An internal error occurred.")),
    "service_unavailable": (503, ("Service indisponible",
                                  "Le module de sécurité ou la base de données ne répond pas ; "
                                  "réessayez plus tard."),
                            ("Service unavailable",
                             "The security module or the database does not answer; "
                             "retry later.")),
}


def language(accept_language: str | None) -> str:
    """'en' when Accept-Language prefers English over French, else 'fr'."""
    best, best_q = "fr", 0.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            name, _, value = p.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in ("fr", "en") and q > best_q:
            best, best_q = primary, q
    return best


def problem(code: str, lang: str, *, field: str | None = None) -> JSONResponse:
    status, fr, en = _PROBLEMS.get(code, _PROBLEMS["internal_error"])
    if code not in _PROBLEMS:
        code = "internal_error"
    title, detail = en if lang == "en" else fr
    body: dict[str, Any] = {"type": PROBLEM_TYPE_BASE + code, "title": title, "status": status,
                            "detail": detail, "code": code}
    if field:
        body["field"] = field
    headers = {"Content-Language": lang}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = "1"
    return Json(body, status_code=status, headers=headers,
                media_type="application/problem+json")


def status_of(code: str) -> int:
    return _PROBLEMS.get(code, _PROBLEMS["internal_error"])[0]


def from_error(exc: e.KmsError, lang: str) -> JSONResponse:
    field = exc.params.get("field") if isinstance(exc, e.InvalidRequest) else None
    return problem(exc.code, lang, field=field)
