// The signed-in user's own account: changing one's password (the current one is asked for; other
// sessions end, this one stays).

import { api } from './api.js';
import { toast } from './dom.js';
import { formDialog } from './users.js';

export async function changePassword() {
  const done = await formDialog({
    title: 'Change your password',
    schemaName: 'password-change',
    initial: {},
    submitLabel: 'Change password',
    submit: async (value) => {
      await api.post('/users/me/password', value);
      return true;
    },
  });
  if (done) toast('Password changed. Your other sessions have ended.');
}
