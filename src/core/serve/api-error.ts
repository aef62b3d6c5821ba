/**
 * Errors as the OpenAI API returns them: an HTTP status and a body
 * `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients raise their usual
 * exceptions (BadRequestError, NotFoundError, RateLimitError, …) with our message.
 */

export type ApiErrorType = 'invalid_request_error' | 'authentication_error' | 'not_found_error' | 'rate_limit_error' | 'server_error' | 'unavailable_error'

export interface ApiErrorBody {
  error: {message: string; type: ApiErrorType; param: string | null; code: string | null}
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: ApiErrorType,
    readonly param: string | null = null,
    readonly code: string | null = null,
    /** Extra response headers (Retry-After, WWW-Authenticate). */
    readonly headers: Record<string, string> = {},
  ) {
    super(message)
    this.name = 'ApiError'
  }

  get body(): ApiErrorBody {
    return {error: {message: this.message, type: this.type, param: this.param, code: this.code}}
  }
}

export function invalidRequest(message: string, param: string | null = null, code: string | null = null): ApiError {
  return new ApiError(400, message, 'invalid_request_error', param, code)
}

export function modelNotFound(requested: string, served: string): ApiError {
  return new ApiError(404, `The model "${requested}" does not exist; this server runs "${served}"`, 'not_found_error', 'model', 'model_not_found')
}

export function methodNotAllowed(method: string, path: string, allow: string): ApiError {
  return new ApiError(405, `Invalid method for URL (${method} ${path}): it takes ${allow.replace(/, HEAD/, '').split(', ').join(' or ')}`, 'invalid_request_error', null, 'method_not_allowed', {Allow: allow})
}

export function unauthorized(message: string): ApiError {
  return new ApiError(401, message, 'authentication_error', null, 'invalid_api_key', {'WWW-Authenticate': 'Bearer'})
}

export function queueFull(limit: number, retryAfterSeconds: number): ApiError {
  return new ApiError(
    429,
    `The server is busy: ${limit} requests are already running or queued (--max-queue); retry later`,
    'rate_limit_error',
    null,
    'queue_full',
    {'Retry-After': String(retryAfterSeconds)},
  )
}

export function shuttingDown(): ApiError {
  return new ApiError(503, 'The server is shutting down', 'unavailable_error', null, 'shutting_down', {Connection: 'close'})
}

export function internalError(): ApiError {
  // No detail: internal messages may carry paths or stack-like text.
  return new ApiError(500, 'The server failed to complete the request', 'server_error', null, 'internal_error')
}
