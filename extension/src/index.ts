/**
 * tpmlab's JupyterLab extension: a left sidebar that polls the server extension
 * (GET /tpmlab/api/status) and offers deploy, undeploy, lens dashboards and the
 * Dask dashboard as commands.
 */
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';

import { deployModel, getStatus, listLenses, listModels, undeployModel } from './api';
import { TpmlabSidebar } from './panel';
import { Poller } from './poll';
import { lensCell } from './templates';
import { IStatusJSON, toViewModel } from './view';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="3" y="3" width="18" height="4" rx="1"/>
    <rect x="3" y="10" width="18" height="4" rx="1" opacity="0.75"/>
    <rect x="3" y="17" width="18" height="4" rx="1" opacity="0.5"/>
    <circle cx="6" cy="5" r="1" fill="#fff"/>
    <circle cx="6" cy="12" r="1" fill="#fff"/>
    <circle cx="6" cy="19" r="1" fill="#fff"/>
  </g>
</svg>`;

export const tpmlabIcon = new LabIcon({ name: 'tpmlab:stages', svgstr: ICON_SVG });

namespace CommandIDs {
  export const openDashboard = 'tpmlab:open-dask-dashboard';
  export const insertLens = 'tpmlab:insert-lens-cell';
  export const newLensNotebook = 'tpmlab:new-lens-notebook';
  export const deploy = 'tpmlab:deploy';
  export const undeploy = 'tpmlab:undeploy';
  export const refresh = 'tpmlab:refresh';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'tpmlab:sidebar',
  description: 'The tpmlab sidebar: Dask cluster, deployed models, requests and usage.',
  autoStart: true,
  optional: [INotebookTracker, ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker | null,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ) => {
    const { commands, shell } = app;
    let last: IStatusJSON | null = null;

    const insertLens = async (model: string, lens: string, newNotebook: boolean) => {
      const code = lensCell(model, lens, last?.cluster?.embedded ? null : last?.cluster?.address ?? null);
      const current = notebooks?.currentWidget;
      if (!newNotebook && current) {
        const nb = current.content;
        NotebookActions.insertBelow(nb);
        nb.activeCell?.model.sharedModel.setSource(code);
        shell.activateById(current.id);
        return;
      }
      const panel: NotebookPanel = await commands.execute('notebook:create-new', {
        kernelName: 'python3'
      });
      await panel.context.ready;
      const first = panel.content.model?.sharedModel.cells[0];
      if (first) {
        first.setSource(code);
      }
    };

    const sidebar = new TpmlabSidebar({
      refresh: () => void poller.refresh(),
      openDashboard: url => void commands.execute(CommandIDs.openDashboard, { url }),
      deploy: async (name, stages) => {
        await commands.execute(CommandIDs.deploy, { name, stages });
      },
      undeploy: async name => {
        await commands.execute(CommandIDs.undeploy, { name });
      },
      openLens: async (model, lens, newNotebook) => {
        await commands.execute(newNotebook ? CommandIDs.newLensNotebook : CommandIDs.insertLens, {
          model,
          lens
        });
      }
    });
    sidebar.title.icon = tpmlabIcon;

    const poller = new Poller<IStatusJSON>(getStatus, {
      onData: status => {
        last = status;
        sidebar.setMessage(null);
        sidebar.render(toViewModel(status));
      },
      onError: (error, failures, delay) => {
        const reason = error instanceof Error ? error.message : String(error);
        sidebar.setMessage(
          `Cannot reach the tpmlab server extension (${reason}); retry ${failures} in ${Math.round(
            delay / 1000
          )} s`
        );
      }
    });

    commands.addCommand(CommandIDs.refresh, {
      label: 'tpmlab: Refresh the cluster status',
      execute: () => poller.refresh()
    });
    commands.addCommand(CommandIDs.openDashboard, {
      label: 'tpmlab: Open the Dask dashboard',
      isEnabled: () => !!(last?.cluster?.dashboard?.url),
      execute: args => {
        const url = (args.url as string) || last?.cluster?.dashboard?.url;
        if (url) {
          window.open(url, '_blank', 'noopener');
        }
      }
    });
    commands.addCommand(CommandIDs.deploy, {
      label: 'tpmlab: Deploy a model',
      execute: async args => {
        const name = args.name as string;
        const stages = (args.stages as number) || 1;
        try {
          await deployModel(name, stages);
        } catch (e) {
          await showErrorMessage(`Could not deploy ${name}`, e as Error);
        }
        await poller.refresh();
      }
    });
    commands.addCommand(CommandIDs.undeploy, {
      label: args => (args.name ? `tpmlab: Undeploy ${args.name}` : 'tpmlab: Undeploy a model'),
      execute: async args => {
        const name = args.name as string;
        try {
          await undeployModel(name);
        } catch (e) {
          await showErrorMessage(`Could not undeploy ${name}`, e as Error);
        }
        await poller.refresh();
      }
    });
    commands.addCommand(CommandIDs.insertLens, {
      label: 'tpmlab: Insert a lens dashboard cell',
      execute: args =>
        insertLens((args.model as string) || 'smollm2-135m', (args.lens as string) || 'logit', false)
    });
    commands.addCommand(CommandIDs.newLensNotebook, {
      label: 'tpmlab: New lens dashboard notebook',
      execute: args =>
        insertLens((args.model as string) || 'smollm2-135m', (args.lens as string) || 'logit', true)
    });
    if (palette) {
      for (const command of [
        CommandIDs.refresh,
        CommandIDs.openDashboard,
        CommandIDs.insertLens,
        CommandIDs.newLensNotebook
      ]) {
        palette.addItem({ command, category: 'tpmlab' });
      }
    }

    shell.add(sidebar, 'left', { rank: 210 });
    if (restorer) {
      restorer.add(sidebar, 'tpmlab-sidebar');
    }
    listModels()
      .then(r => sidebar.setAvailable(r.available))
      .catch(() => undefined);
    listLenses()
      .then(r => {
        sidebar.setLenses(r.lenses);
        for (const [name, error] of Object.entries(r.errors ?? {})) {
          console.warn(`tpmlab: lens ${name} is not offered: ${error}`);
        }
      })
      .catch(reason => console.warn(`tpmlab: cannot list the lenses: ${reason}`));
    poller.start();
  }
};

export default plugin;
