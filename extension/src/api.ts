/** Calls to the server extension's REST API (docs/rest-api.md). */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { ILensesJSON } from './templates';
import { IStatusJSON } from './view';

export async function requestAPI<T>(
  endPoint = '',
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'tpmlab', 'api', endPoint);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON: keep the text for the error message
    }
  }
  if (!response.ok) {
    const message = (data && (data.message || data.reason)) || response.statusText;
    throw new ServerConnection.ResponseError(response, message);
  }
  return data as T;
}

export function getStatus(): Promise<IStatusJSON> {
  return requestAPI<IStatusJSON>('status');
}

export function listModels(): Promise<{ available: string[] }> {
  return requestAPI<{ available: string[] }>('models');
}

/** The registered lenses, for the lens menu (GET /tpmlab/api/lenses). */
export function listLenses(): Promise<ILensesJSON> {
  return requestAPI<ILensesJSON>('lenses');
}

export function deployModel(name: string, stages: number): Promise<unknown> {
  return requestAPI('models', {
    method: 'POST',
    body: JSON.stringify({ name, stages })
  });
}

export function undeployModel(name: string): Promise<unknown> {
  return requestAPI(`models/${encodeURIComponent(name)}`, { method: 'DELETE' });
}
